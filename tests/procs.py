"""Real `promptserve` processes for end-to-end tests: the tiny CLIP saved to a weights file (so
every process loads the same backbone, one fingerprint), `serve` and `worker` started through
the real command line on loopback, and readiness waited for, never slept for."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from safetensors.torch import save_file

from service.backbones.clip import ClipBackbone
from tests.conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def save_weights(backbone: ClipBackbone, path: Path) -> Path:
    """The backbone's weights as a local file that `--pretrained PATH` loads."""
    state = {k: v.detach().contiguous().clone() for k, v in backbone.model.state_dict().items()}
    save_file(state, str(path))
    return path


def env_for(weights: Path, store: str, **settings: str) -> dict[str, str]:
    """The environment of a process on the tiny backbone: PROMPTSERVE_* from keyword settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTSERVE_")}
    env.update(
        PROMPTSERVE_MODEL="",
        PROMPTSERVE_MODEL_CONFIG_PATH=str(TINY_CONFIG),
        PROMPTSERVE_PRETRAINED=str(weights),
        PROMPTSERVE_STORE=store,
        PROMPTSERVE_RUNTIME="torch",
    )
    env.update({f"PROMPTSERVE_{k.upper()}": v for k, v in settings.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip


class Served:
    """A `promptserve serve` process on 127.0.0.1:port."""

    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = _cli(["serve", "--host", "127.0.0.1", "--port", str(self.port)], env, log)

    def wait_ready(self, timeout: float = 90.0) -> Served:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve not ready in {timeout}s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A `promptserve worker` process on the environment's queue."""
    return _cli(["worker"], env, log)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# --- a tiny uploadable dataset: solid colours with a little noise ------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "gray": (128,) * 3}


def png(rgb: tuple[int, ...], seed: int, size: int = 32) -> bytes:
    import random

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size))
    img.putdata(
        [tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb) for _ in range(size * size)]
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def colour_items(per_class: int, seed: int = 0) -> list[dict[str, str]]:
    """[{image: base64 PNG, label}] for every colour, `per_class` each."""
    return [
        {"image": base64.b64encode(png(rgb, seed * 1000 + i)).decode(), "label": name}
        for name, rgb in COLOURS.items()
        for i in range(per_class)
    ]
