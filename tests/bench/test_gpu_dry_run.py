"""bench/gpu.py is run once on a scarce GPU: its --dry-run (tiny models on the CPU, the same code
paths, servers and clients included) must get through every section without an error here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_section_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # cuda-tests is left out: it runs tests of this suite, which skip here without CUDA anyway
    sections = "environment,runtimes,decode,issue16,frontends,peers,issue21"
    cmd = [sys.executable, "-m", "bench.gpu", "--dry-run", "--budget-s", "1500", "--phase-s", "1",
           "--json", str(out), "--var", str(tmp_path / "var"), "--sections", sections]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    # each section's results in the shapes the GPU run reports (not the figures: a loaded CPU
    # may answer no request within a dry run's one-second phase, so no rate is asserted)
    assert results["environment"]["bandwidth_gb_s"] > 0
    parity = results["runtimes"]["parity"]
    assert set(parity) == {"eager fp32", "ONNX CPU EP fp32 (dry run)"}
    assert parity["ONNX CPU EP fp32 (dry run)"][0] < 1e-3  # [max abs diff, min cosine]
    assert set(results["decode"]["probe"]) >= {"baseline 4:2:0", "progressive", "CMYK"}
    assert {r["decode"] for r in results["decode"]["served"]} == {"gpu", "cpu"}
    assert {"raw_img_s", "served", "ratio"} <= set(results["issue16"][0])
    configs = [(r["frontends"], r["decode"], r["per_request"]) for r in results["issue16"]]
    assert configs == [(2, "gpu", 8), (1, "cpu", 8), (2, "cpu", 8), (2, "gpu", 1)]
    for r in results["issue16"]:  # py-spy's sampling of the engine, where py-spy is installed
        profile = r["engine_profile"]
        assert profile == {"py-spy": "not installed"} or profile["samples"] > 0, profile
    assert results["frontends"]["table"].count("| json | 224 |") == 2
    rows = results["peers"]
    assert any("skipped" in r for r in rows if r["label"].startswith("Infinity"))
    assert {"promptserve eager fp32", "promptserve ONNX int8"} <= {r["label"] for r in rows}
    for row in results["decode"]["served"] + [r for r in rows if "statuses" in r]:
        assert set(row["statuses"]) <= {"200", 200}  # whatever was answered was answered well
    assert [r["streams"] for r in results["issue21"]["rows"]] == [1, 2, 1, 2]


def test_the_llava_section_runs_both_engines_on_the_cpu(tmp_path):
    """Issue 21's section alone (the tiny LLaVA stands in for the 7B-shaped one)."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.gpu", "--dry-run", "--budget-s", "600", "--json", str(out),
           "--var", str(tmp_path / "var"), "--sections", "environment,issue21"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["issue21"]["rows"]
    assert [(r["engine"], r["streams"]) for r in rows] == [
        ("continuous", 1), ("continuous", 2), ("static", 1), ("static", 2)]  # fmt: skip
    for r in rows:
        assert r["tokens_s"] > 0 and r["of_bound"] > 0 and r["ttft_max_s"] >= r["ttft_p50_s"]
