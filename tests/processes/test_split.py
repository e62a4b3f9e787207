"""`promptserve serve --frontends 2` with real processes: the same answers and errors as one
process, metrics counted once, and the failures the split must survive (a front end killed,
the engine killed, the supervisor killed), each checked on the process table and /dev/shm.

Every service loads the tiny CLIP from one weights file (one fingerprint), so a checkpoint
uploaded to both modes is served by both, and their answers can be compared.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.backbones.clip import load_clip
from service.engine.control import ControlBlock
from service.engine.shm import SHM_DIR, segment_name
from tests.conftest import CLASSNAMES, TINY_CONFIG
from tests.engine.test_residency import checkpoint
from tests.procs import COLOURS, Served, env_for, png, save_weights

IMAGES = [base64.b64encode(png(rgb, seed=i)).decode() for i, rgb in enumerate(COLOURS.values())]
# Scores are float32 softmaxes from the same weights; the two modes may batch a request with
# different neighbours, and a GEMM's summation order (so its last bits) depends on the batch.
# 1e-4 is far above that (~1e-6) and far below any difference a wrong image or plan makes.
SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_clip("", "none", model_config=TINY_CONFIG)


@pytest.fixture(scope="module")
def weights(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_weights(tiny, tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="module")
def blobs(tiny: Any) -> dict[str, bytes]:
    backbone = tiny
    return {
        "coop-one": checkpoint(backbone, "coop-one", seed=1),
        "maple-one": checkpoint(backbone, "maple-one", seed=2, method="maple"),
    }


def start(weights: Path, tmp: Path, frontends: int, **settings: str) -> Served:
    tmp.mkdir(parents=True, exist_ok=True)
    env = env_for(weights, f"file://{tmp / 'store'}", frontends=str(frontends),
                  local_jobs="false", **settings)  # fmt: skip
    return Served(env, tmp / "serve.log").wait_ready(180)


@pytest.fixture(scope="module")
def services(
    weights: Path, blobs: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[int, Served]]:
    running = {n: start(weights, tmp_path_factory.mktemp(f"fe{n}"), n) for n in (1, 2)}
    try:
        for s in running.values():
            for name, blob in blobs.items():
                r = httpx.post(f"{s.url}/v1/checkpoints", files={"file": (name, blob)}, timeout=30)
                assert r.status_code == 201, r.text
        yield running
    finally:
        for s in running.values():
            s.stop()


def children(pid: int) -> list[int]:
    """The processes `pid` started (the supervisor's engine and front ends)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    out = []
    for child in path.read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"resource_tracker" not in cmd:  # multiprocessing's helper, not one of ours
            out.append(int(child))
    return out


def engine_pid(service: Served) -> int:
    control = ControlBlock.attach(segment_name(service.proc.pid, "control"))
    try:
        return control.engine()[0]
    finally:
        control.close()


def alive(pid: int) -> bool:
    """Running (a zombie that no one has reaped yet is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def segments(service_pid: int) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(segment_name(service_pid, "*")))


def wait(predicate: Any, within: float = 180.0) -> None:
    """Until `predicate()`; `within` only bounds a hung test (a loaded machine is slow)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not true within {within}s")


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/classify", {"images": IMAGES, "classnames": ["red", "green", "blue"], "top_k": 3}),
    ("/v1/classify", {"images": IMAGES, "checkpoint": "coop-one", "top_k": 2}),
    ("/v1/classify", {"images": IMAGES[:2], "checkpoints": ["coop-one", "maple-one"]}),
    ("/v1/embed", {"images": IMAGES[:2], "texts": ["a red square"]}),
    ("/v1/embed", {"images": IMAGES[:1], "checkpoint": "maple-one"}),
    ("/v1/classify", {"images": IMAGES[:1], "checkpoint": "nope"}),  # 404
    ("/v1/classify", {"images": ["not base64!"], "classnames": ["a", "b"]}),  # 400
    (
        "/v1/classify",
        {"images": [base64.b64encode(b"GIF89a....").decode()], "classnames": ["a", "b"]},
    ),
    ("/v1/classify", {"images": [], "classnames": ["a", "b"]}),
    ("/v1/classify", {"images": IMAGES * 20, "classnames": ["a", "b"]}),  # too many images
]


def _close(a: Any, b: Any) -> None:
    if isinstance(a, float):
        assert abs(a - b) <= SCORE_TOL, (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("path,body", REQUESTS, ids=[f"{i}" for i in range(len(REQUESTS))])
def test_two_front_ends_answer_as_one_process(services: dict[int, Served], path: str, body: Any):
    one, two = (httpx.post(services[n].url + path, json=body, timeout=60) for n in (1, 2))
    assert two.status_code == one.status_code, (one.text, two.text)
    if one.status_code != 200:
        assert two.json()["error"]["code"] == one.json()["error"]["code"]
        return
    _close(one.json(), two.json())


def test_the_same_checkpoint_list_and_readiness(services: dict[int, Served]):
    for n, s in services.items():
        names = {c["name"] for c in httpx.get(f"{s.url}/v1/checkpoints").json()["checkpoints"]}
        assert {"coop-one", "maple-one"} <= names, n
        ready = httpx.get(f"{s.url}/readyz").json()
        assert ready["status"] == "ready" and ready["kind"] == "clip"


def _count(url: str, route: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    key = f'promptserve_request_seconds_count{{route="{route}"}} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))


def test_metrics_count_every_request_once_whichever_front_end_answers(services):
    url = services[2].url
    before = _count(url, "embed")
    for _ in range(12):  # new connections: the kernel spreads them over both front ends
        r = httpx.post(f"{url}/v1/embed", json={"texts": ["a red square"]}, timeout=30)
        assert r.status_code == 200
    counts = {_count(url, "embed") for _ in range(8)}
    assert counts == {before + 12}
    text = httpx.get(f"{url}/metrics").text
    assert "promptserve_requests_in_progress 0.0" in text  # read live from the control block
    assert "promptserve_residency_loads" in text  # the engine's own counters, reported


def test_a_dead_front_end_is_replaced_and_the_other_keeps_serving(weights, tmp_path):
    service = start(weights, tmp_path, 2)
    try:
        engine = engine_pid(service)
        front = [p for p in children(service.proc.pid) if p != engine]
        assert len(front) == 2
        os.kill(front[0], signal.SIGKILL)
        body = {"images": IMAGES[:1], "classnames": ["red", "blue"]}
        for _ in range(10):  # each on a new connection; only the survivor (or its heir) answers
            r = httpx.post(f"{service.url}/v1/classify", json=body, timeout=30)
            assert r.status_code == 200
        wait(lambda: len(set(children(service.proc.pid)) - {engine, front[0]}) == 2)
        assert engine_pid(service) == engine  # the engine was not touched
    finally:
        service.stop()


def test_a_dead_engine_fails_requests_in_flight_at_once_and_is_restarted(weights, tmp_path):
    service = start(weights, tmp_path, 2)
    try:
        engine = engine_pid(service)
        os.kill(engine, signal.SIGSTOP)  # a request sent now waits in the engine
        answers: list[httpx.Response] = []
        body = {"images": IMAGES[:1], "classnames": ["red", "blue"]}
        sender = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{service.url}/v1/classify", json=body, timeout=60)))  # fmt: skip
        sender.start()
        wait(lambda: "promptserve_requests_in_progress 1.0" in httpx.get(
            f"{service.url}/metrics").text)  # fmt: skip
        os.kill(engine, signal.SIGKILL)
        sender.join(120)  # the bound of a hung test, not the claim (the front end fails it at
        assert answers and answers[0].status_code == 503  # once, on its pidfd)
        assert answers[0].json()["error"]["code"] == "not_ready"
        wait(lambda: engine_pid(service) not in (0, engine))  # a new engine, warm
        wait(lambda: httpx.get(f"{service.url}/readyz").status_code == 200)
        r = httpx.post(f"{service.url}/v1/classify", json=body, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        service.stop()


def test_no_segment_outlives_the_service(weights, tmp_path):
    service = start(weights, tmp_path / "a", 2)
    pid = service.proc.pid
    assert segment_name(pid, "control") in segments(pid)
    service.stop()  # SIGTERM: drained, removed
    assert service.proc.returncode == 0
    assert segments(pid) == []

    service = start(weights, tmp_path / "b", 2)
    pid, kids = service.proc.pid, children(service.proc.pid)
    service.stop(signal.SIGKILL)  # nothing of ours runs any more: children die with it
    wait(lambda: not any(alive(k) for k in kids))
    assert segments(pid)  # left behind by kill -9 ...
    again = start(weights, tmp_path / "c", 2)
    try:
        assert segments(pid) == []  # ... and removed at the next start
    finally:
        again.stop()


def test_classnames_of_the_tiny_dataset_are_served(services):
    # the checkpoints were trained on CLASSNAMES: both modes label with them
    body = {"images": IMAGES[:1], "checkpoint": "coop-one", "top_k": len(CLASSNAMES)}
    for s in services.values():
        labels = {p["label"] for p in httpx.post(f"{s.url}/v1/classify", json=body).json()
                  ["results"][0]["predictions"][0]}  # fmt: skip
        assert labels == set(CLASSNAMES)


def test_the_consoles_reads_answer_through_the_engine_process(services):
    """GET /v1/residency asks the engine (EngineClient.residents): through the wire it must say
    what one process says once both served the same checkpoints."""
    body = {"images": IMAGES[:1], "checkpoints": ["coop-one", "maple-one"]}
    held = {}
    for n, s in services.items():
        assert httpx.post(f"{s.url}/v1/classify", json=body, timeout=60).status_code == 200
        r = httpx.get(f"{s.url}/v1/residency", timeout=30)
        assert r.status_code == 200, r.text
        held[n] = r.json()
        assert {(x["name"], x["version"]) for x in held[n]["residents"]} >= {
            ("coop-one", 1),
            ("maple-one", 1),
        }
        assert held[n]["serving"] == {"coop-one": 1, "maple-one": 1}
        detail = httpx.get(f"{s.url}/v1/checkpoints/maple-one/versions/1").json()
        assert detail["manifest"]["method"] == "maple" and detail["parameters"] > 0
        options = httpx.get(f"{s.url}/v1/training/options").json()
        assert "coop" in options["methods"]
    assert held[1]["device_budget_bytes"] == held[2]["device_budget_bytes"]


def _jpeg(rgb: tuple[int, ...], seed: int) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png(rgb, seed, size=48))).save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def test_device_decoding_engine_gets_the_jpeg_bytes_across_the_split(weights, blobs, tmp_path):
    """image_decode=gpu: the front ends pass compressed bytes (frames beside the call, not
    slots) and the engine decodes them; on the CPU this is the device path's code with
    torchvision's CPU decoder. Both modes answer alike, a PNG among the JPEGs included (the
    engine decodes that one on its CPU path)."""
    jpegs = [_jpeg(rgb, seed=i) for i, rgb in enumerate(COLOURS.values())]
    body = {"images": [*jpegs, IMAGES[0]], "checkpoint": "coop-one", "top_k": 2}
    answers = []
    for n in (1, 2):
        service = start(weights, tmp_path / f"fe{n}", n, image_decode="gpu")
        try:
            r = httpx.post(f"{service.url}/v1/checkpoints", files={"file": ("coop-one",
                           blobs["coop-one"])}, timeout=30)  # fmt: skip
            assert r.status_code == 201, r.text
            ready = httpx.get(f"{service.url}/readyz").json()
            assert "torchvision" in ready["image_decode"], ready
            r = httpx.post(f"{service.url}/v1/classify", json=body, timeout=60)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        finally:
            service.stop()
    _close(*answers)
