"""The prompted forward on a tiny random LLaVA: equal to the plain model without prompts,
and the same greedy tokens with and without the KV cache when prompted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from service.backbones.llava import LlavaBackbone
from service.backbones.llava_loading import load_llava
from service.errors import WeightsUnavailable
from service.prompts.m2pt import M2PT, batch_prompts

QUESTIONS = ["what is in the image?", "describe the colour of the shape in a few words please."]


def inputs(llava: LlavaBackbone, n_visual: int = 0) -> tuple[list[list[int]], torch.Tensor]:
    rows = [
        llava.encode_chat(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            1,
            n_visual,
        )
        for q in QUESTIONS
    ]
    images = [Image.new("RGB", (40, 40), c) for c in [(255, 0, 0), (0, 90, 200)]]
    return rows, llava.pixel_values(images)


def test_no_prompts_equals_the_plain_models_generate(llava: LlavaBackbone) -> None:
    rows, pixels = inputs(llava)
    assert len(rows[0]) != len(rows[1])  # the batch is left-padded
    ours = llava.greedy(rows, pixels, max_new_tokens=12)
    ids, mask, _ = llava.layout(rows, 0)
    with torch.no_grad():
        ref = llava.model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=12,
            do_sample=False,
            min_new_tokens=12,
        )
    assert [r[ids.shape[1] :] for r in ref.tolist()] == ours
    # and one row alone equals its row in the batch (padding is masked everywhere)
    assert llava.greedy(rows[1:], pixels[1:], max_new_tokens=12) == ours[1:]


def prompted(llava: LlavaBackbone, **cfg: object) -> object:
    method = M2PT()
    c = method.config(cfg)
    params = {k: v * 50 for k, v in method.init(llava, c, seed=3).items()}  # large: visible effect
    plan = method.materialize(params, llava, c)
    return batch_prompts([plan, plan], llava.dtype)


def test_prompted_greedy_is_the_same_with_and_without_the_kv_cache(llava: LlavaBackbone) -> None:
    prompts = prompted(llava)
    rows, pixels = inputs(llava, prompts.n_visual)  # type: ignore[attr-defined]
    cached = llava.greedy(rows, pixels, prompts, max_new_tokens=10, use_cache=True)
    uncached = llava.greedy(rows, pixels, prompts, max_new_tokens=10, use_cache=False)
    assert cached == uncached
    plain_rows, _ = inputs(llava)
    assert cached != llava.greedy(plain_rows, pixels, max_new_tokens=10)  # the prompts matter


@pytest.mark.parametrize(
    "cfg", [{"n_visual": 0}, {"n_text": 0}, {"visual_depth": 1, "text_depth": 2}]
)
def test_partial_prompts_are_consistent_and_change_the_output(
    llava: LlavaBackbone, cfg: dict[str, int]
) -> None:
    prompts = prompted(llava, **cfg)
    n_visual = prompts.n_visual  # type: ignore[attr-defined]
    rows, pixels = inputs(llava, n_visual)
    feats_plain = llava.image_features(pixels)
    feats = llava.image_features(pixels, prompts.vision)  # type: ignore[attr-defined]
    # the reference's layout: nv - 1 prompt rows and the class token ahead of the patches
    assert feats.shape[1] == feats_plain.shape[1] + n_visual == llava.image_tokens(n_visual)
    assert torch.equal(feats[:, n_visual:], feats_plain) == (n_visual == 0)
    a = llava.greedy(rows, pixels, prompts, max_new_tokens=6, use_cache=True)
    assert a == llava.greedy(rows, pixels, prompts, max_new_tokens=6, use_cache=False)


def test_backbone_is_frozen_and_fingerprinted(llava: LlavaBackbone, llava_dir: Path) -> None:
    assert not any(p.requires_grad for p in llava.model.parameters())
    loaded = load_llava("tiny", str(llava_dir))
    assert loaded.fingerprint == llava.fingerprint  # same weights, read back from disk
    rows, pixels = inputs(llava)
    assert loaded.greedy(rows, pixels, max_new_tokens=5) == llava.greedy(
        rows, pixels, max_new_tokens=5
    )
    random = load_llava(str(llava_dir), "none")
    assert random.fingerprint != llava.fingerprint


def test_missing_weights_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="--pretrained PATH"):
        load_llava(str(tmp_path / "absent"), str(tmp_path / "absent"))
    with pytest.raises(WeightsUnavailable, match="--pretrained PATH"):
        load_llava(str(tmp_path), "hub")  # an empty directory: no config, no processor
