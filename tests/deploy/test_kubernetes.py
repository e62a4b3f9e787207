"""The Kubernetes manifests: valid objects of a current API, and consistent with the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.cli import ServeCommand, WorkerCommand, parse
from tests.deploy.common import DEPLOY, check_env, redis_directives, routes

K8S = DEPLOY / "kubernetes"
VERSION = "1.32"  # a Kubernetes API that kubernetes-validate ships the schemas of


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object kustomization.yaml applies, by (kind, name)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        for d in docs(K8S / name):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


def test_every_manifest_is_a_valid_object():
    files = sorted(K8S.glob("*.yaml"))
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {f.name for f in files} - {"kustomization.yaml", "secret.example.yaml"}
    for f in files:
        if f.name == "kustomization.yaml":
            continue
        for d in docs(f):
            kubernetes_validate.validate(d, VERSION, strict=True)
    bad = docs(K8S / "api.yaml")[0]
    bad["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: typos are caught
        kubernetes_validate.validate(bad, VERSION, strict=True)


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    """What a container's environment holds: ConfigMaps it reads, then its own env entries."""
    out: dict[str, str] = {}
    for source in c.get("envFrom", []):
        out.update(objects[("ConfigMap", source["configMapRef"]["name"])]["data"])
    defined: list[str] = []
    for item in c.get("env", []):
        value = item.get("value", "<secret>")
        for ref in [p.split(")")[0] for p in value.split("$(")[1:]]:
            assert ref in defined, f"$({ref}) used before it is defined in {c['name']}"
        defined.append(item["name"])
        out[item["name"]] = value
    return out


def test_environment_names_are_settings(objects):
    for kind, name in objects:
        if kind in ("Deployment", "StatefulSet"):
            check_env(env_of(container(objects[(kind, name)]), objects), name)
    secret = docs(K8S / "secret.example.yaml")[0]
    check_env(secret["stringData"], "secret.example.yaml")


def test_api_probes_ports_and_gpu_match_the_app(objects):
    api = objects[("Deployment", "promptserve-api")]
    c = container(api)
    env = env_of(c, objects)
    (port,) = c["ports"]
    assert port["name"] == "http" and port["containerPort"] == int(env["PROMPTSERVE_PORT"])
    assert env["PROMPTSERVE_HOST"] == "0.0.0.0"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                        ("startupProbe", "/healthz")):  # fmt: skip
        get = c[probe]["httpGet"]
        assert get == {"path": path, "port": "http"} and ("GET", path) in routes()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert isinstance(parse(c["args"]), ServeCommand)
    assert api["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert env["PROMPTSERVE_STORE"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/weights"]["readOnly"] is True
    assert env["PROMPTSERVE_PRETRAINED"].startswith("/weights/")


def test_service_and_autoscaler_point_at_the_api(objects):
    api = objects[("Deployment", "promptserve-api")]
    labels = api["spec"]["template"]["metadata"]["labels"]
    svc = objects[("Service", "promptserve-api")]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    hpa = objects[("HorizontalPodAutoscaler", "promptserve-api")]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "promptserve-api"
    }  # fmt: skip
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_worker_runs_the_api_image_on_the_same_store(objects):
    api = container(objects[("Deployment", "promptserve-api")])
    worker = container(objects[("Deployment", "promptserve-worker")])
    assert worker["image"] == api["image"]
    assert isinstance(parse(worker["args"]), WorkerCommand)
    assert env_of(worker, objects)["PROMPTSERVE_STORE"] == env_of(api, objects)["PROMPTSERVE_STORE"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_redis_persists_on_a_volume_inside_the_cluster(objects):
    conf = objects[("ConfigMap", "redis-config")]["data"]["redis.conf"]
    assert redis_directives(conf) == redis_directives((DEPLOY / "redis.conf").read_text())
    assert {"appendonly yes", "appendfsync everysec", "dir /data"} <= redis_directives(conf)
    sts = objects[("StatefulSet", "redis")]
    c = container(sts)
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": "/data"} in c["volumeMounts"]
    svc = objects[("Service", "redis")]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert all("nodePort" not in p for p in svc["spec"]["ports"])
