"""The Dockerfile and the compose stack, checked by parsing (no Docker engine on our machines)."""

from __future__ import annotations

import json
import shlex
import subprocess
from importlib.resources import files
from typing import Any

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from service.cli import ServeCommand, WorkerCommand, parse
from tests.deploy.common import (
    DEPLOY,
    ROOT,
    check_env,
    interpolate,
    read_env_file,
    redis_directives,
    routes,
)


@pytest.fixture(scope="module")
def stages() -> list[list[dict[str, Any]]]:
    """The Dockerfile's instructions, one list per stage (FROM first), comments dropped."""
    parsed = DockerfileParser(str(ROOT / "Dockerfile")).structure
    out: list[list[dict[str, Any]]] = []
    for ins in parsed:
        if ins["instruction"] == "FROM":
            out.append([])
        if ins["instruction"] != "COMMENT" and out:
            out[-1].append(ins)
    return out


def instrs(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def final_env(stages: list[list[dict[str, Any]]]) -> dict[str, str]:
    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    return dict(parser.envs)  # the last stage's, which is what the image runs with


def test_dockerfile_builds_on_cuda_runtime_in_stages(stages):
    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    assert len(stages) >= 2, "multi-stage: dependencies built apart from the final image"
    base = parser.baseimage
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base, base
    final = stages[-1]
    assert any(v.startswith("--from=") for v in instrs(final, "COPY")), "final copies the build"


def test_dependencies_are_a_layer_before_the_code(stages):
    build = stages[0]
    order = [(i["instruction"], i["value"]) for i in build]
    pyproject = next(n for n, (k, v) in enumerate(order) if k == "COPY" and "pyproject.toml" in v)
    deps = next(n for n, (k, v) in enumerate(order) if k == "RUN" and "pip install -r" in v)
    code = next(n for n, (k, v) in enumerate(order) if k == "COPY" and "service" in v.split())
    assert pyproject < deps < code
    text = (ROOT / "Dockerfile").read_text()
    # torch from the registry's default (CUDA) build: no CPU index, no +cpu pin
    assert "download.pytorch.org" not in text and "+cpu" not in text


def test_final_image_has_no_build_tools_or_caches(stages):
    for run in instrs(stages[-1], "RUN"):
        assert "pip install" not in run and "build-essential" not in run and "gcc" not in run
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run
    for run in instrs(stages[0], "RUN"):
        if "pip install" in run:  # the pip cache is a BuildKit cache mount, never a layer
            assert "--mount=type=cache" in run or "--no-cache-dir" in run


def test_runs_as_a_non_root_user(stages):
    users = instrs(stages[-1], "USER")
    assert users and users[-1] not in ("root", "0"), users
    order = [i["instruction"] for i in stages[-1]]
    assert order.index("USER") < order.index("CMD")


def test_healthcheck_and_default_command_match_the_app(stages):
    env = final_env(stages)
    health = instrs(stages[-1], "HEALTHCHECK")
    assert len(health) == 1 and "/healthz" in health[0] and "PROMPTSERVE_PORT" in health[0]
    assert ("GET", "/healthz") in routes()
    assert instrs(stages[-1], "EXPOSE") == [env["PROMPTSERVE_PORT"]]
    entry = json.loads(instrs(stages[-1], "ENTRYPOINT")[0])
    cmd = json.loads(instrs(stages[-1], "CMD")[0])
    assert entry == ["promptserve"] and cmd == ["serve"]
    assert isinstance(parse(cmd), ServeCommand)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'promptserve = "service.cli:main"' in pyproject


def test_every_variable_is_a_setting_and_weights_are_mounted(stages):
    env = final_env(stages)
    check_env(env, "Dockerfile")
    volumes = [v for value in instrs(stages[-1], "VOLUME") for v in json.loads(value)]
    store = env["PROMPTSERVE_STORE"].removeprefix("file://")
    assert any(store.startswith(v + "/") for v in volumes), (store, volumes)
    copies = " ".join(v for stage in stages for v in instrs(stage, "COPY"))
    for suffix in (".safetensors", ".pt", ".pth", ".bin"):  # weights are never baked in
        assert suffix not in copies
    assert "PROMPTSERVE_PRETRAINED" not in env, "weights come from a mounted volume"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list: nothing (.venv, var/, deploy/.env) by accident"
    assert "**/*.safetensors" in patterns


# --- docker-compose ----------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose specification's schema as check-jsonschema vendors it (no network)."""
    text = (files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    return json.loads(text)


def load_compose() -> dict[str, Any]:
    """docker-compose.yml with ${...} expanded from .env.example, as `docker compose` would."""
    example = read_env_file(DEPLOY / ".env.example")
    raw = (DEPLOY / "docker-compose.yml").read_text()
    return yaml.safe_load(interpolate(raw, example))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_compose_file_follows_the_compose_specification(compose):
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = {**compose, "services": {**compose["services"], "api": {**compose["services"]["api"],
              "restart_policy": "always"}}}  # fmt: skip
    assert not validator.is_valid(broken), "the schema must catch a misplaced key"


def test_api_and_worker_run_the_same_image(compose):
    api, worker = compose["services"]["api"], compose["services"]["worker"]
    assert api["image"] == worker["image"] and api["build"] == worker["build"]
    assert (DEPLOY / api["build"]["context"] / api["build"]["dockerfile"]).resolve() == (
        ROOT / "Dockerfile"
    )
    assert isinstance(parse(worker["command"]), WorkerCommand)
    assert isinstance(parse(api["command"]), ServeCommand)
    for svc in (api, worker):  # a GPU each
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices)
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_variables_are_settings(compose):
    example = read_env_file(DEPLOY / ".env.example")
    check_env(example, ".env.example")
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        if name in ("api", "worker"):
            assert svc["env_file"] == [".env"]
            check_env({**example, **env}, f"compose service {name}")
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    tracked = subprocess.run(
        ["git", "ls-files", "deploy/.env"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert tracked.stdout.strip() == "", "deploy/.env holds secrets: never commit it"


def test_api_port_readiness_and_volumes_match_the_app(compose):
    api = compose["services"]["api"]
    container_port = int(api["ports"][0].rsplit(":", 1)[1])
    image_port = int(DockerfileParser(str(ROOT / "Dockerfile")).envs["PROMPTSERVE_PORT"])
    assert container_port == image_port
    check = " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{image_port}/readyz" in check and ("GET", "/readyz") in routes()
    mounts = {v.split(":")[1]: v for v in api["volumes"]}
    assert mounts["/weights"].endswith(":ro")
    example = read_env_file(DEPLOY / ".env.example")
    assert example["PROMPTSERVE_PRETRAINED"].startswith("/weights/")


def test_the_store_is_the_compose_redis(compose):
    for name in ("api", "worker"):
        url = compose["services"][name]["environment"]["PROMPTSERVE_STORE"]
        assert url.startswith("redis://") and url.split("@")[-1] == "redis:6379/0", url


def test_redis_persists_and_is_not_published(compose):
    redis = compose["services"]["redis"]
    assert "ports" not in redis, "Redis must not be reachable from the host"
    conf = redis_directives((DEPLOY / "redis.conf").read_text())
    assert {"appendonly yes", "appendfsync everysec", "dir /data"} <= conf
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the append-only file on a volume"
    assert any(v.startswith("./redis.conf:") for v in redis["volumes"])
    command = shlex.join(redis["command"])
    assert "/usr/local/etc/redis/redis.conf" in command and "--requirepass" in command
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_prometheus_is_optional_and_scrapes_the_api(compose):
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert prom["depends_on"]["api"]["condition"] == "service_healthy"
    assert all(p.startswith("127.0.0.1:") for p in prom["ports"])
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and ("GET", "/metrics") in routes()
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    # /metrics needs a key: the scrape sends one, from a file mounted next to the config
    key = job["authorization"]["credentials_file"]
    assert any(v.endswith(f":{key}:ro") for v in prom["volumes"])
