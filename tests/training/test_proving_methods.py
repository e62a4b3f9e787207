"""On the proving ground's shifted domain, every method beats zero-shot on the base classes, and
a trained checkpoint served through the API scores what the trainer reported."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from prompts_store import open_store
from service.app import create_app
from service.prompts.registry import trainable
from service.settings import Settings
from service.training import proving_ground as pg
from service.training.datasets import load_data
from service.training.recipes import PROVING_CONFIG, PROVING_RECIPE
from service.training.runs import DatasetSpec, TrainSpec, run

DOMAIN = "gray"
FAST, CONFIG = PROVING_RECIPE, PROVING_CONFIG


@pytest.fixture(scope="session")
def proving():
    """The proving-ground CLIP (pre-trained on first use, ~2 min on 2 cores; cached after)."""
    return pg.build_backbone()


@pytest.fixture(scope="session")
def zero_shot_base(proving):
    test = pg.make_dataset(DOMAIN, "test", per_class=50, seed=0)
    return pg.zero_shot_accuracy(proving, test.subset(test.base_classes()))


def _spec(method: str, **kw) -> TrainSpec:
    return TrainSpec(
        name=f"pg-{method}",
        method=method,
        shots=16,
        base_to_novel=True,
        dataset=DatasetSpec(kind="proving_ground", domain=DOMAIN),
        recipe=FAST,
        method_config=CONFIG.get(method, {}),
        **kw,
    )


@pytest.mark.parametrize("method", trainable("classify"))
def test_method_beats_zero_shot_on_base_classes(proving, zero_shot_base, method, tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    result = run(_spec(method), proving, store, load_data)
    base = result.metrics["base"]["accuracy"]
    assert base >= zero_shot_base + 0.10, (method, base, zero_shot_base)
    assert proving.fingerprint == pg.build_backbone().fingerprint  # the backbone is untouched


def _png(image: torch.Tensor) -> str:
    buf = io.BytesIO()
    Image.fromarray(image.numpy()).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_served_checkpoint_scores_what_the_trainer_reported(proving, tmp_path):
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    result = run(_spec("maple"), proving, store, load_data)
    reported = result.metrics["base"]["accuracy"]
    test = pg.make_dataset(DOMAIN, "test", per_class=50, seed=0)
    base = test.subset(test.base_classes())
    settings = Settings(
        store=store_url, model="proving-clip", pretrained="none", runtime="torch", max_images=64
    )
    hits = 0
    with TestClient(create_app(settings, backbone=proving)) as client:
        for i in range(0, len(base), 64):
            images = [_png(img) for img in base.images[i : i + 64]]
            r = client.post(
                "/v1/classify", json={"checkpoint": "pg-maple", "images": images, "top_k": 1}
            )
            assert r.status_code == 200, r.text
            for preds, label in zip(
                r.json()["results"][0]["predictions"], base.labels[i : i + 64].tolist(), strict=True
            ):
                hits += preds[0]["label"] == base.classnames[label]
    assert hits / len(base) == pytest.approx(reported, abs=1 / len(base))
