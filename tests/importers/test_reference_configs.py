"""Every trainer config of both reference repositories (docs/METHODS.md's table): the file its run
writes, built here in the reference layout and written the way Dassl writes it, is imported with
no --method, mapped to the table's method and config, and served with the reference's logits.

The backbones are tiny random CLIPs deep enough for the configs' depths (12 layers, as ViT-B/16)
and a tiny ModifiedResNet for the RN50/RN101 CoOp runs. Tolerance 1e-4 on logits of scale ~14:
the reference forward is a separate float32 code path (LND layout, other op order), whose
differences are float32 rounding, ~1e-6, whatever the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.backbones.clip import load_clip
from service.checkpoints import materialize
from service.engine.forward import classify
from service.importers.dassl import import_dassl
from service.importers.layouts import backbone_key
from tests.importers.dassl_files import save_dassl
from tests.importers.reference_configs import (
    MPL_CONFIGS,
    PHRASE,
    ROWS,
    SRC_CONFIGS,
    build,
    reference_logits,
    render,
)

HERE = Path(__file__).parent
METHODS_MD = HERE.parents[1] / "docs" / "METHODS.md"
BEGIN, END = "<!-- reference-configs:begin -->", "<!-- reference-configs:end -->"
# the folder Dassl's register_model name gives each trainer's files
MODEL_DIR = {"CoOp": "prompt_learner", "CoCoOp": "prompt_learner", "MaPLe":
             "MultiModalPromptLearner", "VPT": "prompt_learner"}  # fmt: skip


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(3)
    return load_clip("", "none", model_config=HERE / "deep_clip.json")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(4)
    return load_clip("", "none", model_config=HERE / "tiny_rn_clip.json")


def test_every_config_of_both_repositories_has_a_row():
    assert {r.config for r in ROWS if r.repo in ("MPL", "both")} == set(MPL_CONFIGS)
    assert {r.config for r in ROWS if r.repo in ("SRC", "both")} == set(SRC_CONFIGS)
    assert len(MPL_CONFIGS) == 22 and len(SRC_CONFIGS) == 23


def test_docs_table_is_the_tested_table():
    block = METHODS_MD.read_text().split(BEGIN)[1].split(END)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("| ")][1:]  # after the header
    assert lines == [render(r) for r in ROWS]


def _served(ckpt, bb, images):
    plan = materialize(ckpt, bb)
    return torch.stack(classify(bb, images, [plan] * len(images)))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_reference_config_is_imported_and_served_exactly(row, vit, resnet, classnames, tmp_path):
    bb, size = (resnet, 64) if row.backbone.startswith("RN") else (vit, 32)
    gen = torch.Generator().manual_seed(ROWS.index(row))
    images = torch.randn(3, 3, size, size, generator=gen)
    state = build(row, bb, classnames, gen)
    trainable = [k for k in state if "token_" not in k and backbone_key(k) is None]
    epochs = row.settings["MAX_EPOCH"]
    folder = tmp_path / row.run_dir / "seed1" / MODEL_DIR.get(row.trainer, "VLPromptLearner")
    path = save_dassl(
        folder / f"model.pth.tar-{epochs}", state, trainable, epochs,
        warmup=not row.config.endswith("rn50_val"),
    )  # fmt: skip
    ckpt, _ = import_dassl(path, name="run", classnames=classnames, backbone=bb)
    assert ckpt.manifest.method == row.method
    assert {k: ckpt.manifest.method_config[k] for k in row.expected} == row.expected
    ours = _served(ckpt, bb, images)
    assert (ours - reference_logits(row, state, bb, images, classnames)).abs().max() <= 1e-4
    if row.trainer in ("CoOp", "CoCoOp") and row.settings["CTX_INIT"]:
        same, _ = import_dassl(
            path, name="run", classnames=classnames, backbone=bb, ctx_init=PHRASE
        )
        assert (_served(same, bb, images) - ours).abs().max() <= 1e-5
