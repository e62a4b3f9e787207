"""A run end to end on files: data -> train -> evaluate -> one checkpoint in the store."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from prompts_store import open_store
from service.checkpoints import load
from service.training.datasets import load_data
from service.training.runs import DatasetSpec, TrainSpec, run
from service.training.trainer import Cancelled

COLORS = {
    "red_square": (220, 20, 20),
    "green_square": (20, 200, 40),
    "blue_square": (20, 40, 220),
    "gray_square": (128, 128, 128),
}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(6):
            shade = tuple(max(0, min(255, c + 10 * i - 25)) for c in rgb)
            Image.new("RGB", (40, 40), shade).save(root / name / f"{i}.png")
    return root


def _spec(folder, **kw):
    base = {
        "name": "squares",
        "method": "coop",
        "dataset": DatasetSpec(kind="image_folder", root=str(folder)),
        "method_config": {"n_ctx": 4},
        "shots": 4,
        "recipe": {"epochs": 2, "warmup_epochs": 0, "batch_size": 8},
    }
    return TrainSpec(**{**base, **kw})


def test_run_publishes_one_validated_checkpoint(backbone, folder, tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    seen = []
    result = run(
        _spec(folder), backbone, store, load_data, out_dir=tmp_path / "runs", progress=seen.append
    )
    assert [row["epoch"] for row in seen] == [1, 2]
    assert (result.published.name, result.published.version) == ("squares", 1)
    stored = store.get("squares")
    manifest = load(stored.data, backbone).manifest
    assert manifest.classnames == ["blue square", "gray square", "green square", "red square"]
    assert 0.0 <= manifest.metrics["test_accuracy"] <= 1.0
    assert manifest.dataset["num_classes"] == 4 and manifest.dataset["shots"] == 4
    assert manifest.parent is None
    assert result.curves is not None and result.curves.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((result.curves.parent / "run.json").read_text())
    assert len(saved["history"]) == 2
    second = run(_spec(folder, activate=False), backbone, store, load_data)
    assert second.published.version == 2 and store.current("squares") == 1
    assert load(store.get("squares", 2).data, backbone).manifest.parent == 1


def test_base_to_novel_reports_hm(backbone, folder, tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    result = run(_spec(folder, base_to_novel=True), backbone, store, load_data)
    assert set(result.metrics) >= {"base", "novel", "hm"}
    manifest = load(store.get("squares").data, backbone).manifest
    assert len(manifest.classnames) == 2 and "hm" in manifest.metrics


def test_cancelled_or_failed_runs_publish_nothing(backbone, folder, tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    with pytest.raises(Cancelled):
        run(_spec(folder), backbone, store, load_data, should_stop=lambda: True)
    bad = _spec(folder, dataset=DatasetSpec(kind="image_folder", root=str(tmp_path / "nope")))
    with pytest.raises(Exception):  # noqa: B017 - any failure, as long as nothing is published
        run(bad, backbone, store, load_data)
    assert store.names() == []


def test_cli_train_runs_in_the_foreground(backbone, folder, tmp_path, monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setattr("service.cli.load_backbone", lambda settings: backbone)
    code = main(
        [
            "train",
            "--name",
            "squares",
            "--method",
            "bias",
            "--dataset",
            "image_folder",
            "--root",
            str(folder),
            "--shots",
            "2",
            "--recipe",
            "epochs=2",
            "warmup_epochs=0",
            "--config",
            'towers="vision"',
            "--store",
            f"file://{tmp_path / 'store'}",
            "--out-dir",
            str(tmp_path / "runs"),
            "--pretrained",
            "none",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "published squares v1 (bias" in out and "accuracy" in out
    assert open_store(f"file://{tmp_path / 'store'}").current("squares") == 1


def test_cli_eval_writes_metrics_into_the_manifest(backbone, folder, tmp_path, monkeypatch):
    from service.checkpoints import dump, new_manifest
    from service.cli import main
    from service.prompts import get_method

    monkeypatch.setattr("service.cli.load_backbone", lambda settings: backbone)
    names = ["blue square", "gray square", "green square", "red square"]
    m = get_method("zeroshot")
    path = tmp_path / "zs.safetensors"
    path.write_bytes(dump({}, new_manifest("zs", "zeroshot", backbone, names)))
    code = main(
        [
            "eval",
            str(path),
            "--dataset",
            "image_folder",
            "--root",
            str(folder),
            "--pretrained",
            "none",
        ]
    )
    assert code == 0 and m is not None
    metrics = load(path.read_bytes(), backbone).manifest.metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
