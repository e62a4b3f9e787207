"""The backbone: loading rules, fingerprint, and the prompted forward's equality with open_clip."""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from service.backbones import clip as clip_mod
from service.backbones.clip import fingerprint_state, load_clip
from service.errors import BackboneError, WeightsUnavailable
from tests.conftest import TINY_CONFIG


def test_no_prompt_forward_equals_open_clip(backbone, images):
    ours = backbone.encode_image(images)
    ref = backbone.model.encode_image(images)
    assert (ours - ref).abs().max().item() <= 1e-5
    ids = backbone.tokenize(["a photo of a cat.", "dog", "a very long " * 5 + "prompt"])
    assert (backbone.encode_text_ids(ids) - backbone.model.encode_text(ids)).abs().max() <= 1e-5


def test_zero_biases_equal_plain_backbone(backbone, images):
    zeros_v = torch.zeros(backbone.vision_layers, backbone.vision_width)
    ref = backbone.model.encode_image(images)
    assert (backbone.encode_image(images, bias=zeros_v) - ref).abs().max() <= 1e-5
    ids = backbone.tokenize(["a photo of a cat."])
    zeros_t = torch.zeros(backbone.text_layers, backbone.text_width)
    out = backbone.encode_text_ids(ids, bias=zeros_t)
    assert (out - backbone.model.encode_text(ids)).abs().max() <= 1e-5


def test_nonzero_bias_and_tokens_change_features(backbone, images):
    plain = backbone.encode_image(images)
    bias = torch.zeros(1, backbone.vision_width)
    bias[0, 0] = 1.0
    assert (backbone.encode_image(images, bias=bias) - plain).abs().max() > 1e-3
    tokens = torch.randn(2, 3, backbone.vision_width)
    for placement in ("append", "prepend"):
        out = backbone.encode_image(images, tokens=tokens, placement=placement)
        assert out.shape == plain.shape
        assert (out - plain).abs().max() > 1e-3


def test_deep_tokens_are_replaced_per_layer(backbone, images):
    """Layer-l tokens matter only for l < depth: changing layer 1 changes the output."""
    tokens = torch.randn(2, 3, backbone.vision_width)
    base = backbone.encode_image(images, tokens=tokens)
    changed = tokens.clone()
    changed[1] += torch.randn(3, backbone.vision_width)
    assert (backbone.encode_image(images, tokens=changed) - base).abs().max() > 1e-4
    # depth-1 tokens are carried through every later layer untouched by replacement
    shallow = backbone.encode_image(images, tokens=tokens[:1])
    assert (shallow - base).abs().max() > 1e-4


def test_per_sample_tokens_match_one_by_one(backbone, images):
    tokens = torch.randn(images.shape[0], 2, 3, backbone.vision_width)
    bias = torch.randn(images.shape[0], 3, backbone.vision_width) * 0.1
    batched = backbone.encode_image(images, tokens=tokens, bias=bias)
    for i in range(images.shape[0]):
        one = backbone.encode_image(images[i : i + 1], tokens=tokens[i], bias=bias[i])
        assert torch.allclose(batched[i], one[0], atol=1e-5)


def test_backbone_is_frozen_and_in_eval(backbone):
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_fingerprint_identifies_weights(backbone, other_backbone):
    assert backbone.fingerprint.startswith("sha256:")
    assert backbone.fingerprint != other_backbone.fingerprint
    assert fingerprint_state(backbone.model.state_dict()) == backbone.fingerprint
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    state["logit_scale"] += 1e-3
    assert fingerprint_state(state) != backbone.fingerprint


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file_loads_same_backbone(backbone, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = load_clip("tiny_clip", str(path), model_config=TINY_CONFIG)
    assert loaded.fingerprint == backbone.fingerprint
    assert (
        loaded.encode_image(torch.ones(1, 3, 32, 32))
        - backbone.encode_image(torch.ones(1, 3, 32, 32))
    ).abs().max() <= 1e-6


def test_precision_keeps_fingerprint(backbone, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    half = load_clip("tiny_clip", str(path), model_config=TINY_CONFIG, precision="bf16")
    assert half.fingerprint == backbone.fingerprint
    assert half.dtype == torch.bfloat16
    a = torch.nn.functional.normalize(half.encode_image(torch.ones(2, 3, 32, 32)).float(), dim=-1)
    b = torch.nn.functional.normalize(backbone.encode_image(torch.ones(2, 3, 32, 32)), dim=-1)
    assert (a * b).sum(-1).min() > 0.99


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(WeightsUnavailable, match="--pretrained PATH"):
        load_clip("tiny_clip", str(tmp_path / "nope.safetensors"), model_config=TINY_CONFIG)


def test_unknown_tag_names_the_fix():
    with pytest.raises(WeightsUnavailable, match="make demo"):
        load_clip("ViT-B-32", "no-such-tag")


def test_download_failure_is_a_clear_error_not_random_weights(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise RuntimeError("Failed to download weights: network unreachable")
        raise AssertionError("must not build a random model when weights were asked for")

    monkeypatch.setattr(clip_mod.open_clip, "create_model", offline)
    with pytest.raises(WeightsUnavailable) as err:
        load_clip("ViT-B-32", "openai")
    assert "no network" in err.value.message and "--pretrained PATH" in err.value.message


def test_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"foo": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsUnavailable, match="state dict"):
        load_clip("tiny_clip", str(path), model_config=TINY_CONFIG)


def test_random_weights_only_by_name_and_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        load_clip("tiny_clip", "none", model_config=TINY_CONFIG)
    assert any("RANDOM WEIGHTS" in r.message for r in caplog.records)


def test_bad_model_config_and_unknown_model(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(BackboneError, match="not an open_clip model config"):
        load_clip("", "none", model_config=bad)
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        load_clip("No-Such-Model", "none")
    assert "tiny_clip" in open_clip.list_models()


def test_text_runs_only_up_to_the_longest_prompt(backbone, monkeypatch):
    """Under the causal mask the pooled token never sees later padding, so it is not computed."""
    lengths = []
    block = backbone.text.transformer.resblocks[0]
    original = block.forward

    def recording(x, *args, **kwargs):
        lengths.append(x.shape[1])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(block, "forward", recording)
    ids = backbone.tokenize(["a photo of a cat.", "dog"])
    out = backbone.encode_text_ids(ids)
    assert lengths == [int(ids.argmax(-1).max()) + 1] and lengths[0] < backbone.context_length
    assert (out - backbone.model.encode_text(ids)).abs().max() <= 1e-5
