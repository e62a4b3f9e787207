"""M²PT training on a small instruction set in LLaVA's conversation JSON: loss goes down, only
the prompts move, and the published checkpoint is then served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from prompts_store import open_store
from service.app import create_app
from service.backbones.clip import fingerprint_state
from service.backbones.llava import LlavaBackbone
from service.settings import Settings
from service.training.datasets import load_data
from service.training.runs import DatasetSpec, TrainSpec, run
from tests.llava.conftest import make_backbone

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230)}


def conversations(root: Path) -> Path:
    records = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (36, 36), rgb).save(root / f"{name}.png")
        records.append(
            {
                "id": name,
                "image": f"{name}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat colour is it?"},
                    {"from": "gpt", "value": f"it is {name}."},
                    {"from": "human", "value": "how many shapes?"},
                    {"from": "gpt", "value": "one square."},
                ],
            }
        )
    records.append(
        {
            "id": "text",
            "conversations": [
                {"from": "human", "value": "describe the colour"},
                {"from": "gpt", "value": "yellow."},
            ],
        }
    )
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def fresh() -> LlavaBackbone:
    return make_backbone(0, init_range=0.3)  # larger weights: prompts can move the output


@pytest.mark.parametrize(("train_projector", "train_head"), [(False, False), (True, True)])
def test_training_lowers_the_loss_and_the_checkpoint_is_served(
    fresh: LlavaBackbone, tmp_path: Path, train_projector: bool, train_head: bool
) -> None:
    """Prompts alone, and as the reference's recipe trains: with the projector and the head."""
    before = fingerprint_state(fresh.model.state_dict())
    store = open_store(f"file://{tmp_path / 'store'}")
    spec = TrainSpec(
        name="colours",
        method="m2pt",
        dataset=DatasetSpec(kind="llava_json", split_file=str(conversations(tmp_path))),
        method_config={
            "n_visual": 4,
            "n_text": 4,
            "train_projector": train_projector,
            "train_head": train_head,
        },
        recipe={"lr": 0.05, "epochs": 25, "batch_size": 4},
    )
    rows: list[dict[str, object]] = []
    result = run(spec, fresh, store, load_data, progress=rows.append)
    m = result.metrics
    ends = [r for r in rows if r["epoch_end"]]  # 7 samples, batches of 4: 2 steps per epoch
    assert m["train_samples"] == 7 and len(ends) == 25 and ends[-1]["step"] == 50
    assert m["final_loss"] < 0.6 * m["initial_loss"], m
    assert fingerprint_state(fresh.model.state_dict()) == before  # the backbone did not move
    keys = set(result.result.params)
    assert ("projector.linear_1.weight" in keys) == train_projector
    assert ("head.weight" in keys) == train_head
    if train_head:  # it moved from the base's, where it started
        moved = result.result.params["head.weight"] - fresh.model.lm_head.weight.detach()
        assert float(moved.abs().max()) > 1e-3
    assert {"visual_prompts", "text_prompts"} <= keys
    assert result.published.version == 1 and store.current("colours") == 1
    store.close()

    settings = Settings(store=f"file://{tmp_path / 'store'}", backbone="llava")
    with TestClient(create_app(settings, backbone=fresh)) as client:
        body = {"checkpoint": "colours", "instruction": "describe the colour", "max_new_tokens": 4}
        r = client.post("/v1/answer", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1
        plain = client.post("/v1/answer", json={**body, "checkpoint": None}).json()["answer"]
        assert r.json()["answer"] != plain
