"""Language-only IVLP (depth_vision 0) through everything that serves it: the config expresses it,
validation wants no vision tensor, the Plan has no vision tokens and the plain signature, it
shares the plain encoder pass with text-only plans, and it trains."""

from __future__ import annotations

import pytest
import torch

from service.checkpoints import dump, load, materialize, new_manifest
from service.engine.forward import classify
from service.errors import ExtraTensor, InvalidConfig
from service.prompts import get_method
from service.prompts.plans import PLAIN
from service.training.trainer import tensor_batches, train

LANGUAGE_ONLY = {"n_ctx_vision": 0, "depth_vision": 0, "n_ctx_text": 4, "depth_text": 3}


@pytest.mark.parametrize("method", ["ivlp", "promptsrc"])
def test_config_and_shapes(backbone, classnames, method):
    m = get_method(method)
    cfg = m.config(LANGUAGE_ONLY)
    assert m.shapes(backbone, cfg, classnames) == {"text_ctx": (3, 4, backbone.text_width)}
    # as in the reference, depth 0 ignores the vision context size
    assert "vision_ctx" not in m.shapes(backbone, m.config({"depth_vision": 0}), classnames)
    with pytest.raises(InvalidConfig, match="n_ctx_vision is 0 but depth_vision is not"):
        m.config({"n_ctx_vision": 0, "depth_vision": 3})


def _checkpoint(backbone, classnames, params, config=LANGUAGE_ONLY):
    manifest = new_manifest("lp", "ivlp", backbone, classnames, config)
    return load(dump(params, manifest), backbone)


def test_plan_is_plain_and_shares_the_plain_pass(backbone, images, classnames):
    m = get_method("ivlp")
    params = m.init(backbone, m.config(LANGUAGE_ONLY), classnames, seed=1)
    params["text_ctx"] = params["text_ctx"] + torch.randn(params["text_ctx"].shape) * 0.5
    plan = materialize(_checkpoint(backbone, classnames, params), backbone)
    assert plan.vision_tokens is None and plan.signature == PLAIN
    coop = get_method("coop")
    coop_cfg = coop.config({"n_ctx": 4})
    other = coop.materialize(coop.init(backbone, coop_cfg, classnames, 2), backbone, coop_cfg,
                             classnames)  # fmt: skip
    assert other.signature == plan.signature  # one encoder pass for both
    mixed = classify(backbone, images, [plan, other, plan, other, plan])
    alone = classify(backbone, images, [plan] * 5)
    for i in (0, 2, 4):
        assert (mixed[i] - alone[i]).abs().max() <= 1e-5
    # the image side is the plain encoder: same features as a plan without any prompts
    feats = backbone.encode_image(images)
    expected = plan.logits(torch.nn.functional.normalize(feats.float(), dim=-1))
    assert (torch.stack(alone) - expected).abs().max() <= 1e-4


def test_a_vision_tensor_in_a_language_only_checkpoint_is_refused(backbone, classnames):
    m = get_method("ivlp")
    params = m.init(backbone, m.config(LANGUAGE_ONLY), classnames)
    params["vision_ctx"] = torch.zeros(1, 2, backbone.vision_width)
    with pytest.raises(ExtraTensor, match="vision_ctx"):
        _checkpoint(backbone, classnames, params)


def test_language_only_trains(backbone, classnames):
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32, generator=gen), torch.arange(16) % 4
    recipe = get_method("ivlp").recipe.with_overrides(
        {"epochs": 4, "warmup_epochs": 0, "batch_size": 8, "lr": 0.05, "optimizer": "adamw"}
    )
    result = train("ivlp", backbone, tensor_batches(images, labels, 8), classnames,
                   method_config=LANGUAGE_ONLY, recipe=recipe)  # fmt: skip
    assert set(result.params) == {"text_ctx"}
    assert result.history[-1]["loss"] < result.history[0]["loss"]
