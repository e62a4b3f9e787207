"""Mixed-checkpoint batching: one encoder pass per signature, one product per plan."""

from __future__ import annotations

import torch

from service.engine.forward import classify, encode, gather_prompts, group, signature
from service.prompts import get_method


def _plan(backbone, method, classnames, seed, config=None):
    m = get_method(method)
    cfg = m.config(config or {})
    params = m.init(backbone, cfg, classnames, seed=seed)
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}
    return m.materialize(params, backbone, cfg, classnames)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls, self.sizes = fn, 0, []

    def __call__(self, images, *args, **kwargs):
        self.calls += 1
        self.sizes.append(images.shape[0])
        return self.fn(images, *args, **kwargs)


def test_classify_is_one_encoder_pass_and_no_text_pass(backbone, images, classnames, monkeypatch):
    plan = _plan(backbone, "maple", classnames, 0, {"depth": 2})
    text_before = backbone.text_calls
    counter = Counter(backbone.encode_image)
    monkeypatch.setattr(backbone, "encode_image", counter)
    products = []
    original = type(plan).logits

    def counting_logits(self, feats):
        products.append(feats.shape[0])
        return original(self, feats)

    monkeypatch.setattr(type(plan), "logits", counting_logits)
    out = classify(backbone, images, [plan] * len(images))
    assert len(out) == len(images) and out[0].shape == (len(classnames),)
    assert counter.calls == 1 and counter.sizes == [len(images)]
    assert products == [len(images)]  # one matrix product for the whole batch
    assert backbone.text_calls == text_before  # class embeddings were computed at materialize


def test_mixed_checkpoints_of_one_signature_share_a_pass(backbone, images, classnames, monkeypatch):
    plans = [_plan(backbone, "maple", classnames, seed, {"depth": 2}) for seed in range(5)]
    assert len({p.signature for p in plans}) == 1
    alone = [classify(backbone, images[i : i + 1], [plans[i]])[0] for i in range(5)]
    counter = Counter(backbone.encode_image)
    monkeypatch.setattr(backbone, "encode_image", counter)
    mixed = classify(backbone, images, plans)
    assert counter.calls == 1
    for a, b in zip(alone, mixed, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_text_only_and_bias_only_plans_share_the_plain_pass(
    backbone, images, classnames, monkeypatch
):
    plans = [
        _plan(backbone, "zeroshot", classnames, 0),
        _plan(backbone, "coop", classnames, 1, {"n_ctx": 4}),
        _plan(backbone, "bias", classnames, 2),
        _plan(backbone, "bias", classnames, 3, {"towers": "vision", "depth_vision": 1}),
        _plan(backbone, "dualview", classnames, 4),
    ]
    assert len(group(plans, signature)) == 1
    alone = [classify(backbone, images[i : i + 1], [plans[i]])[0] for i in range(5)]
    counter = Counter(backbone.encode_image)
    monkeypatch.setattr(backbone, "encode_image", counter)
    mixed = classify(backbone, images, plans)
    assert counter.calls == 1
    for a, b in zip(alone, mixed, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_different_signatures_get_one_pass_each(backbone, images, classnames, monkeypatch):
    plans = [
        _plan(backbone, "vpt", classnames, 0),
        _plan(backbone, "zeroshot", classnames, 0),
        _plan(backbone, "ivlp", classnames, 0),
        _plan(backbone, "vpt", classnames, 1),
        _plan(backbone, "cocoop", classnames, 0),
    ]
    assert len(group(plans, signature)) == 3
    alone = [encode(backbone, images[i : i + 1], [plans[i]])[0] for i in range(5)]
    counter = Counter(backbone.encode_image)
    monkeypatch.setattr(backbone, "encode_image", counter)
    feats = encode(backbone, images, plans)
    assert counter.calls == 3
    for a, b in zip(alone, feats, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_materialize_encodes_class_text_once(backbone, images, classnames):
    m = get_method("maple")
    cfg = m.config({"depth": 2})
    params = m.init(backbone, cfg, classnames, seed=0)
    before = backbone.text_calls
    plan = m.materialize(params, backbone, cfg, classnames)
    assert backbone.text_calls == before + 1  # all classes in one text pass
    for _ in range(3):
        classify(backbone, images, [plan] * len(images))
    assert backbone.text_calls == before + 1  # never again per request


def test_cocoop_runs_one_text_pass_per_batch(backbone, images, classnames):
    plan = _plan(backbone, "cocoop", classnames, 0)
    before = backbone.text_calls
    classify(backbone, images, [plan] * len(images))
    assert backbone.text_calls == before + 1  # B x C conditional prompts in one pass


def test_one_checkpoints_prompts_are_broadcast_not_copied(backbone, images, classnames):
    """A batch of one checkpoint hands the forward the plan's own tensors (no [B, ...] copy),
    with the same result as per-row tensors, bit for bit on the same machine."""
    plan = _plan(backbone, "bias", classnames, 0)
    deep = _plan(backbone, "maple", classnames, 0, {"depth": 2})
    for p in (plan, deep):
        tokens, bias = gather_prompts([p] * len(images))
        assert tokens is p.vision_tokens and bias is p.vision_bias
        rows = (
            None if tokens is None else tokens.expand(len(images), *tokens.shape).clone(),
            None if bias is None else bias.expand(len(images), *bias.shape).clone(),
        )
        shared = backbone.encode_image(images, tokens, bias, p.placement)
        stacked = backbone.encode_image(images, *rows, p.placement)
        assert torch.equal(shared, stacked)
    other = _plan(backbone, "bias", classnames, 1)
    tokens, bias = gather_prompts([plan, other])  # two checkpoints: rows of their own
    assert tokens is None and bias is not None and bias.shape[0] == 2
