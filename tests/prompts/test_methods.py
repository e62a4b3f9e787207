"""Every method: published defaults, the equalities the papers imply, and save/load round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.backbones.clip import ClipBackbone
from service.checkpoints import dump, load, materialize, new_manifest
from service.engine.forward import classify, encode
from service.errors import InvalidConfig
from service.prompts import get_method
from service.prompts.base import prompt_text
from service.prompts.plans import PLAIN
from service.prompts.registry import on_backbone
from service.prompts.zeroshot import TEMPLATE_SETS


def _plan(backbone, method, classnames, config=None, seed=3, params=None, templates=()):
    m = get_method(method)
    cfg = m.config(config)
    params = params if params is not None else m.init(backbone, cfg, classnames, seed)
    return m.materialize(params, backbone, cfg, classnames, templates), params


def _logits(backbone, plan, images):
    return torch.stack(classify(backbone, images, [plan] * images.shape[0]))


def test_published_defaults():
    assert get_method("coop").config().model_dump() == {
        "n_ctx": 16,
        "csc": False,
        "class_token_position": "end",
        "ctx_init": "",
    }
    assert get_method("cocoop").config().n_ctx == 4
    maple = get_method("maple").config()
    assert (maple.depth, maple.n_ctx, maple.ctx_init) == (9, 2, "a photo of a")
    src = get_method("promptsrc").config()
    assert (src.n_ctx_text, src.n_ctx_vision, src.depth_text, src.depth_vision) == (4, 4, 9, 9)
    vpt = get_method("vpt").config()
    assert (vpt.n_ctx_vision, vpt.depth_vision) == (8, 12)
    assert len(TEMPLATE_SETS["imagenet80"]) == 80
    assert TEMPLATE_SETS["eurosat"] == ("a centered satellite photo of {}.",)


def test_coop_from_phrase_equals_zero_shot_template(backbone, images, classnames):
    coop, _ = _plan(backbone, "coop", classnames, {"ctx_init": "a photo of a"})
    zs, _ = _plan(backbone, "zeroshot", classnames, templates=["a photo of a {}."])
    assert (coop.classes - zs.classes).abs().max() <= 1e-5
    assert (_logits(backbone, coop, images) - _logits(backbone, zs, images)).abs().max() <= 1e-4


@pytest.mark.parametrize("position", ["middle", "front"])
def test_coop_class_positions_and_csc(backbone, images, classnames, position):
    end, params = _plan(backbone, "coop", classnames, {"n_ctx": 4})
    other, _ = _plan(
        backbone, "coop", classnames, {"n_ctx": 4, "class_token_position": position}, params=params
    )
    assert other.classes.shape == end.classes.shape
    assert (other.classes - end.classes).abs().max() > 1e-4  # the position matters
    csc_cfg = {"n_ctx": 4, "csc": True}
    csc_params = {"ctx": params["ctx"].expand(len(classnames), -1, -1).clone()}
    csc, _ = _plan(backbone, "coop", classnames, csc_cfg, params=csc_params)
    # class-specific context equal for every class is the unified context
    assert (csc.classes - end.classes).abs().max() <= 1e-5


def test_zero_initialized_bias_equals_plain_zero_shot(backbone, images, classnames):
    bias, params = _plan(backbone, "bias", classnames)
    assert all(float(t.abs().max()) == 0.0 for t in params.values())
    zs, _ = _plan(backbone, "zeroshot", classnames)
    assert bias.signature == PLAIN
    assert (_logits(backbone, bias, images) - _logits(backbone, zs, images)).abs().max() <= 1e-4


def test_maple_depth_one_equals_shallow_form(backbone, images, classnames):
    """Depth 1: context in the text input, its projection appended to the image input, nothing
    replaced deeper. Recomputed here through open_clip's own unmodified transformers."""
    plan, p = _plan(backbone, "maple", classnames, {"depth": 1})
    assert "deep_text" not in p and plan.vision_tokens.shape[0] == 1
    visual = backbone.visual
    shared = F.linear(p["ctx"], p["proj.weight"], p["proj.bias"])
    x = visual.conv1(images).flatten(2).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(len(images), -1, -1)
    x = torch.cat([cls, x], 1) + visual.positional_embedding
    x = visual.ln_pre(torch.cat([x, shared.expand(len(images), -1, -1)], 1))
    x = visual.transformer(x)
    img = visual.ln_post(x[:, 0]) @ visual.proj
    text = prompt_text(backbone, classnames, "a photo of a")
    emb = text.embeddings.clone()
    emb[:, 1:3] = p["ctx"]
    t = emb + backbone.model.positional_embedding
    t = backbone.model.ln_final(backbone.model.transformer(t, attn_mask=backbone.model.attn_mask))
    txt = t[torch.arange(len(classnames)), text.pool_index] @ backbone.model.text_projection
    ref = backbone.logit_scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    assert (_logits(backbone, plan, images) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("method", on_backbone(ClipBackbone.kind))
def test_round_trip_save_load_identical_logits(backbone, images, classnames, method):
    m = get_method(method)
    cfg = m.config({})
    params = m.init(backbone, cfg, classnames, seed=11)
    params = {k: v + 0.01 * torch.randn_like(v) for k, v in params.items()}  # "trained"
    before = m.materialize(params, backbone, cfg, classnames)
    data = dump(
        params, new_manifest(f"rt-{method}", method, backbone, classnames, cfg.model_dump())
    )
    after = materialize(load(data, backbone), backbone)
    assert torch.equal(_logits(backbone, before, images), _logits(backbone, after, images))
    assert after.labels == tuple(classnames)


def test_cocoop_head_is_image_conditional(backbone, images, classnames):
    m = get_method("cocoop")
    params = m.init(backbone, m.config(), classnames, seed=0)
    params["meta_net.linear1.bias"] = torch.ones_like(params["meta_net.linear1.bias"])  # ReLU on
    plan, _ = _plan(backbone, "cocoop", classnames, params=params)
    assert plan.head is not None and plan.classes is None
    feats = encode(backbone, images, [plan] * len(images))
    per_image = plan.head(feats)
    assert per_image.shape == (len(images), len(classnames), backbone.embed_dim)
    assert (per_image[0] - per_image[1]).abs().max() > 0  # differs per image
    # one-by-one equals batched
    one = plan.logits(feats[:1])
    assert torch.allclose(plan.logits(feats)[0], one[0], atol=1e-5)


def test_dualview_is_between_its_views(backbone, classnames):
    soft, params = _plan(backbone, "dualview", classnames, {"view_weight": 1.0})
    hand, _ = _plan(backbone, "dualview", classnames, {"view_weight": 0.0}, params=params)
    mid, _ = _plan(backbone, "dualview", classnames, {"view_weight": 0.5}, params=params)
    zs, _ = _plan(backbone, "zeroshot", classnames)
    assert (hand.classes - zs.classes).abs().max() <= 1e-5
    expected = F.normalize(soft.classes + hand.classes, dim=-1)
    assert (mid.classes - expected).abs().max() <= 1e-5


def test_template_ensemble_is_mean_of_normalized_views(backbone, classnames):
    templates = ["a photo of a {}.", "a drawing of a {}.", "{} texture."]
    plan, _ = _plan(backbone, "zeroshot", classnames, templates=templates)
    views = [
        backbone.text_features([t.format(c.replace("_", " ")) for c in classnames])
        for t in templates
    ]
    assert (plan.classes - F.normalize(sum(views), dim=-1)).abs().max() <= 1e-5
    named, _ = _plan(backbone, "zeroshot", classnames, {"template_set": "imagenet80"})
    assert named.classes.shape == (len(classnames), backbone.embed_dim)


def test_invalid_configs_are_typed_errors():
    with pytest.raises(InvalidConfig):
        get_method("coop").config({"n_ctx": 0})
    with pytest.raises(InvalidConfig):
        get_method("maple").config({"nonsense": 1})
    with pytest.raises(InvalidConfig):
        get_method("zeroshot").config({"template_set": "nope"})
