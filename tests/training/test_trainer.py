"""The trainer on the tiny backbone: every method learns, only prompt parameters change."""

from __future__ import annotations

import pytest
import torch

from service.backbones.clip import fingerprint_state
from service.prompts import get_method
from service.prompts.recipe import gaussian_weights
from service.prompts.registry import trainable
from service.training.evaluate import accuracy, harmonic_mean
from service.training.trainer import Cancelled, mixed_precision, tensor_batches, train

TRAINABLE = trainable("classify")
SMALL = {"maple": {"depth": 2}, "coop": {"n_ctx": 4}, "vpt": {"n_ctx_vision": 2}}


def _data():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=gen)
    labels = torch.arange(16) % 4
    return images, labels


def _fast(method, **extra):
    return get_method(method).recipe.with_overrides(
        {
            "epochs": 6,
            "warmup_epochs": 0,
            "batch_size": 8,
            "lr": 0.05,
            "optimizer": "adamw",
            "weight_decay": 0.0,
            **extra,
        }
    )


@pytest.mark.parametrize("method", TRAINABLE)
def test_every_method_learns_and_the_backbone_stays_frozen(backbone, classnames, method):
    images, labels = _data()
    before = backbone.fingerprint
    recipe = _fast(method, gpa_mean=6.0 if method == "promptsrc" else 0.0)
    result = train(
        method,
        backbone,
        tensor_batches(images, labels, recipe.batch_size),
        classnames,
        method_config=SMALL.get(method),
        recipe=recipe,
    )
    curve = [row["loss"] for row in result.history]
    assert curve[-1] < curve[0], curve
    m = get_method(method)
    shapes = m.shapes(backbone, m.config(result.config), classnames)
    assert {k: tuple(v.shape) for k, v in result.params.items()} == shapes
    assert not any(v.requires_grad for v in result.params.values())
    assert fingerprint_state(backbone.model.state_dict()) == before
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_trained_plan_beats_its_initialization_on_training_data(backbone, classnames):
    images, labels = _data()
    recipe = _fast("bias", epochs=15, batch_size=16)
    m = get_method("bias")
    cfg = m.config()
    start = m.materialize(m.init(backbone, cfg, classnames), backbone, cfg, classnames)
    result = train("bias", backbone, tensor_batches(images, labels, 16), classnames, recipe=recipe)
    plan = m.materialize(result.params, backbone, cfg, classnames)
    before = accuracy(backbone, start, images, labels, classnames)["accuracy"]
    after = accuracy(backbone, plan, images, labels, classnames)
    assert after["accuracy"] > before and set(after["per_class"]) == set(classnames)


def test_schedule_warmup_then_cosine():
    r = get_method("maple").recipe
    assert r.epoch_lr(0) == r.warmup_lr
    assert r.epoch_lr(1) == pytest.approx(r.lr)
    assert r.epoch_lr(1) > r.epoch_lr(2) > r.epoch_lr(4) > 0
    constant = get_method("m2pt").recipe
    assert constant.epoch_lr(0) == constant.epoch_lr(2) == constant.lr


def test_gaussian_epoch_weights_peak_at_the_mean():
    w = gaussian_weights(20, 15, 1)
    assert sum(w) == pytest.approx(1.0) and max(range(20), key=w.__getitem__) == 14


def test_cancel_stops_training(backbone, classnames):
    images, labels = _data()
    with pytest.raises(Cancelled):
        train(
            "coop",
            backbone,
            tensor_batches(images, labels, 4),
            classnames,
            method_config={"n_ctx": 4},
            should_stop=lambda: True,
        )


def test_harmonic_mean():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0


@pytest.mark.parametrize("method", ["coop", "maple"])
def test_bf16_mixed_precision_learns_and_keeps_float32_parameters(backbone, classnames, method):
    """The autocast path a GPU takes by default, forced on the CPU (bf16 autocast exists there)."""
    images, labels = _data()
    recipe = _fast(method, mixed_precision="bf16")
    seen_dtypes: list[torch.dtype] = []
    hook = backbone.visual.transformer.resblocks[0].register_forward_hook(
        lambda _m, _i, out: seen_dtypes.append(out.dtype)
    )
    try:
        result = train(
            method, backbone, tensor_batches(images, labels, 8), classnames,
            method_config=SMALL.get(method), recipe=recipe,
        )  # fmt: skip
    finally:
        hook.remove()
    assert torch.bfloat16 in seen_dtypes  # the forward really ran in half precision
    curve = [row["loss"] for row in result.history]
    assert curve[-1] < curve[0], curve
    assert all(v.dtype == torch.float32 for v in result.params.values())
    assert all(torch.isfinite(v).all() for v in result.params.values())


def test_mixed_precision_defaults_to_the_gpu_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    coop = get_method("coop").recipe
    assert not mixed_precision(coop, cpu) and mixed_precision(coop, gpu)
    off = coop.with_overrides({"mixed_precision": "off"})
    assert not mixed_precision(off, gpu)
    with pytest.raises(ValueError, match="mixed_precision"):
        coop.with_overrides({"mixed_precision": "fp8"})


def test_progress_reports_steps_and_an_eta_after_the_first_epoch(backbone, classnames):
    images, labels = _data()
    rows: list[dict] = []
    recipe = _fast("coop", epochs=3)
    train(
        "coop", backbone, tensor_batches(images, labels, 8), classnames,
        method_config=SMALL["coop"], recipe=recipe, progress=rows.append,
    )  # fmt: skip
    ends = [r for r in rows if r["epoch_end"]]
    assert [r["epoch"] for r in ends] == [1, 2, 3]
    assert [r["step"] for r in ends] == [2, 4, 6] and all(r["steps"] == 6 for r in ends)
    assert ends[-1]["eta_s"] == 0 and ends[0]["eta_s"] is not None and ends[0]["eta_s"] >= 0
