"""`make demo` keeps its promise: the requests it prints work and answer what its showcase says,
the accuracy it claims is what the served API measures on the whole test sets, the claim holds
(each checkpoint at least 2x zero-shot on its domain, right on most of its showcased images),
and its training job example trains. Served by a real uvicorn server on loopback."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from prompts_store import open_store
from promptserve.client import Client
from service.app import create_app
from service.cli import main as cli_main
from service.demo import DEMO_CHECKPOINTS, ZERO_SHOT, Demo, examples, prepare
from service.training import proving_ground as pg
from tests.served import serve

ROOT = Path(__file__).resolve().parents[2]
# The demo computes its figures in-process on uint8 tensors; the API decodes PNGs and batches
# differently. Both are the serving forward on the same pixels, so only near-ties can flip:
# allow 3 of 1,600 images (and the table's rounding to 0.1%).
TOLERANCE = 3 / 1600 + 0.0005


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    root = tmp_path_factory.mktemp("demo")
    demo = prepare(f"file://{root / 'store'}", 8000, root=root)
    names = sorted(open_store(demo.settings.store).names())
    assert names == sorted(n for n, *_ in DEMO_CHECKPOINTS)
    return demo


def _claims(text: str) -> dict[str, tuple[str, float, float]]:
    """checkpoint -> (domain, zero-shot, accuracy), parsed from the printed table."""
    rows = re.findall(r"^  (\S+) v\d+\s+\S+\s+(\S+)\s+([\d.]+)%\s+([\d.]+)%", text, re.M)
    return {name: (domain, float(z) / 100, float(a) / 100) for name, domain, z, a in rows}


def _showcase(text: str) -> dict[str, tuple[str, dict[str, str]]]:
    """image file name -> (true label, {who: answer}), parsed from the printed showcase."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^  (\S+\.png)\s+true: (.+?)\s{2,}(.+)$", line)
        if m:
            answers = dict(re.findall(r"(\S+): (.+?) [✓✗]", m.group(3)))
            out[m.group(1)] = (m.group(2), answers)
    return out


def _served_accuracy(client: Client, dataset: pg.Dataset, **target: object) -> float:
    hits = 0
    for i in range(0, len(dataset), 64):
        images = [im.numpy() for im in dataset.images[i : i + 64]]
        answer = client.classify(images, top_k=1, **target)  # type: ignore[arg-type]
        for preds, label in zip(
            answer.results[0].predictions, dataset.labels[i : i + 64].tolist(), strict=True
        ):
            hits += preds[0].label == dataset.classnames[label]
    return hits / len(dataset)


def test_the_demo_claims_what_the_api_measures_and_the_claim_holds(demo):
    text = examples("http://127.0.0.1:8000", demo)
    assert "http://127.0.0.1:8000/ui" in text  # the console
    claims = _claims(text)
    assert set(claims) == {n for n, *_ in DEMO_CHECKPOINTS}
    shown = _showcase(text)
    assert len(shown) == len({d for *_, d, _ in DEMO_CHECKPOINTS}) * 4
    labels = json.loads((demo.images / "labels.json").read_text())
    for name, (label, _) in shown.items():
        assert labels[name]["label"] == label  # the true label is the test set's
        assert (demo.images / name).is_file()
    with serve(create_app(demo.settings, backbone=demo.backbone)) as url, Client(url) as client:
        for name, (domain, zero_shot, accuracy) in claims.items():
            assert accuracy >= 2 * zero_shot, (name, accuracy, zero_shot)  # the story holds
            test = pg.make_dataset(domain, "test", per_class=50)
            served = _served_accuracy(client, test, checkpoint=name)
            assert served == pytest.approx(accuracy, abs=TOLERANCE), name
            plain = _served_accuracy(
                client, test, classnames=test.classnames, templates=list(pg.EVAL_TEMPLATES)
            )
            assert plain == pytest.approx(zero_shot, abs=TOLERANCE), name
            mine = [a[name] == label for label, a in shown.values() if name in a]
            assert sum(mine) > len(mine) / 2, (name, shown)  # right on most showcased images


def test_the_printed_requests_answer_what_the_showcase_says(demo, capsys):
    with serve(create_app(demo.settings, backbone=demo.backbone)) as url:
        text = examples(url, demo)
        shown = _showcase(text)
        lines = [ln.strip() for ln in text.splitlines() if ln.startswith("  ")]
        curls = [ln for ln in lines if ln.startswith("curl -F images=@")]
        assert len(curls) == len(DEMO_CHECKPOINTS) + 1  # one per checkpoint and the zero-shot
        for line in curls:
            args = shlex.split(line.split("      (")[0])
            fields = dict(a.split("=", 1) for a in args[2:-1:2])
            image = Path(fields.pop("images")[1:])
            if "classnames" in fields:  # curl's `-F field=<file` sends the file's content
                fields["classnames"] = Path(fields["classnames"][1:]).read_text()
            with image.open("rb") as f:
                r = httpx.post(args[-1], files={"images": f}, data=fields, timeout=60)
            assert r.status_code == 200, r.text
            who = fields.get("checkpoint", ZERO_SHOT)
            top1 = r.json()["results"][0]["predictions"][0][0]["label"]
            assert top1 == shown[image.name][1][who], (line, top1)
        commands = [ln for ln in lines if ln.startswith("promptserve classify")]
        assert len(commands) == 2
        for line in commands:
            args = shlex.split(line)[1:]
            files = sorted(glob.glob(args[-1]))  # what the shell expands
            assert len(files) == 4
            capsys.readouterr()
            assert cli_main([*args[:-1], "--top-k", "1", *files]) == 0
            name = args[args.index("--checkpoint") + 1]
            for out in capsys.readouterr().out.splitlines():
                path, _, top = out.split("  ", 2)
                assert top.rsplit(" ", 1)[0] == shown[Path(path).name][1][name], out
        (snippet,) = [ln for ln in lines if ln.startswith("python -c")]
        code = shlex.split(snippet)[2]
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        image = Path(re.search(r"\['(\S+\.png)'\]", code).group(1)).name  # type: ignore[union-attr]
        names = re.search(r"checkpoints=(\[.*?\])", code).group(1)  # type: ignore[union-attr]
        expected = [shown[image][1][n] for n in json.loads(names.replace("'", '"'))]
        assert json.loads(run.stdout.replace("'", '"')) == expected


def test_the_printed_training_job_trains(demo):
    with serve(create_app(demo.settings, backbone=demo.backbone)) as url, Client(url) as client:
        text = examples(url, demo)
        body = json.loads(re.search(r"/v1/jobs -d '(.+?)'", text).group(1))  # type: ignore[union-attr]
        job = client.jobs.submit(body)
        start = time.monotonic()
        # a bound for a broken build, not a measurement: a loaded 2-core CI machine took > 300 s
        done = client.jobs.wait(job.id, timeout=1800, poll_s=0.2)
        assert done.state == "finished", (done, time.monotonic() - start)
        image = next(s.path for s in demo.shown)
        served = client.classify([image], checkpoint=body["name"])
        assert served.results[0].version == 1
