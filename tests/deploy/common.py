"""What the deployment tests share: the app's routes, the settings' names, variable expansion."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PREFIX = "PROMPTSERVE_"
# Names the files may set that are not promptserve settings (each is used for a reason).
NOT_SETTINGS = {
    "REDIS_PASSWORD",  # composed into PROMPTSERVE_STORE; Redis's --requirepass
    "REDISCLI_AUTH",  # redis-cli's password, for the Redis healthcheck
    "PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "DEBIAN_FRONTEND",
    "PIP_DISABLE_PIP_VERSION_CHECK", "HF_HOME",
    "IMAGE", "WEIGHTS_DIR", "API_PORT",  # compose interpolation only (deploy/.env.example)
}  # fmt: skip


@cache
def routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route the app serves."""
    from service.app import create_app

    paths = create_app(Settings()).openapi()["paths"]  # the public surface, routers included
    return frozenset((m.upper(), path) for path, ops in paths.items() for m in ops)


def check_env(env: Mapping[str, Any], where: str) -> None:
    """Every name is a Settings field (PROMPTSERVE_*) or a known non-setting, and the settings
    it sets validate (types, allowed values) as Settings would read them from the environment."""
    fields = Settings.model_fields
    unknown = [
        k
        for k in env
        if not (k.startswith(PREFIX) and k[len(PREFIX) :].lower() in fields)
        and k not in NOT_SETTINGS
    ]
    assert not unknown, f"{where} sets variables that are not settings: {unknown}"
    values = {
        k[len(PREFIX) :].lower(): str(v)
        for k, v in env.items()
        if k.startswith(PREFIX) and "$(" not in str(v)
    }
    Settings(**values)  # raises ValidationError on a bad value


_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable expansion: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ for a dollar."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":-", "-") and not value:
            return arg or ""
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (compose's .env syntax without quotes), comments and blanks skipped."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def redis_directives(text: str) -> set[str]:
    """redis.conf's directives, normalised (comments and blank lines dropped)."""
    return {
        " ".join(line.split())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
