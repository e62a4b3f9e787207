"""M²PT's image layout is the reference's (William-wAng618/M2PT): its CLIP tower prepends the
visual prompts before the class token and writes each layer's prompt into the layer's input in
place, and LLaVA's feature selection (`hidden_states[vision_feature_layer]`, then row 0 dropped
under 'default'/'patch') runs on that prompted sequence. So the language model sees nv - 1 raw
prompt vectors, the class token and the patches: patches + nv positions per image."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image
from torch import Tensor

from service.backbones.llava import LlavaBackbone, Prompts
from service.engine.answering import user_message
from service.engine.generation import GenerationEngine, Sampling
from service.errors import BadRequest
from service.prompts.m2pt import M2PT, batch_prompts
from tests.llava.conftest import tiny_model, tiny_processor

PATCHES = (32 // 8) ** 2  # the tiny tower: 32-pixel images, 8-pixel patches


def backbone(layer: int = -2, strategy: str = "default") -> LlavaBackbone:
    processor = tiny_processor()
    model = tiny_model(processor, seed=1, init_range=0.2)
    model.config.vision_feature_layer = layer  # type: ignore[attr-defined]
    model.config.vision_feature_select_strategy = strategy  # type: ignore[attr-defined]
    return LlavaBackbone(model, processor, "tiny-llava", "none")


def reference_selected(bb: LlavaBackbone, pixels: Tensor, vision: Tensor) -> Tensor:
    """The reference's CLIPEncoder + feature_select, written out: every layer runs, each
    layer's input gets its prompt rows written in place and is then recorded, the last output
    is recorded as is; LLaVA picks one recorded state and drops row 0 under 'default'."""
    n, depth = vision.shape[2], vision.shape[1]
    x = bb.tower.pre_layrnorm(bb.tower.embeddings(pixels))
    hidden = torch.cat([vision[:, 0], x], dim=1)
    states = []
    for idx, layer in enumerate(bb.tower.encoder.layers):
        hidden = hidden.clone()
        if idx < depth:
            hidden[:, :n] = vision[:, idx]
        states.append(hidden)
        hidden = layer(hidden, None)
    states.append(hidden)
    selected = states[bb.model.config.vision_feature_layer]
    return selected[:, 1:] if bb.strategy == "default" else selected


def vision_prompts(bb: LlavaBackbone, batch: int, n: int = 5) -> Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.randn(batch, bb.vision_layers, n, bb.vision_width, generator=gen) * 3


def pixels_of(bb: LlavaBackbone, *colours: tuple[int, int, int]) -> Tensor:
    return bb.pixel_values([Image.new("RGB", (40, 40), c) for c in colours])


@pytest.mark.parametrize(
    ("layer", "strategy"), [(-2, "default"), (-2, "full"), (-1, "default"), (1, "default")]
)
@torch.no_grad()
def test_image_features_are_the_references_selection_of_the_prompted_tower(
    layer: int, strategy: str
) -> None:
    bb = backbone(layer, strategy)
    pixels = pixels_of(bb, (250, 10, 10), (10, 120, 240))
    # without prompts: exactly transformers' own image features
    ours_plain = bb.image_features(pixels)
    hf = bb.model.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=layer, vision_feature_select_strategy=strategy
    ).pooler_output
    assert torch.equal(ours_plain, torch.stack(list(hf)))
    assert ours_plain.shape[1] == bb.image_tokens(0) == PATCHES + (strategy == "full")

    vision = vision_prompts(bb, 2)
    ours = bb.image_features(pixels, vision)
    ref = bb.projector(reference_selected(bb, pixels, vision))
    assert ours.shape == ref.shape
    assert ours.shape[1] == bb.image_tokens(5) == PATCHES + 5 + (strategy == "full")
    assert (ours - ref).abs().max() <= 1e-5
    if layer != -1:  # the selected state's own prompt rows are projected as they are
        skip = 1 if strategy == "default" else 0
        raw = bb.projector(vision[:, bb.feature_layers, skip:])
        assert torch.allclose(ours[:, : 5 - skip], raw, atol=1e-6)
    assert not torch.allclose(ours[:, -PATCHES:], ours_plain[:, -PATCHES:], atol=1e-3)


@torch.no_grad()
def test_the_language_model_sees_the_references_image_positions() -> None:
    bb = backbone()
    nv = 5
    # the plain count is what transformers' processor expands <image> to
    plain = bb.processor(
        text="<image> hi", images=[Image.new("RGB", (40, 40))], return_tensors="pt"
    )["input_ids"]
    assert int((plain == bb.image_token_id).sum()) == bb.image_tokens(0) == PATCHES
    msg = user_message("what is in the image?", True)
    ids = bb.encode_chat(msg, 1, nv)
    # the reference splices (nv - 1) prompt rows + class token + patches in place of <image>
    assert ids.count(bb.image_token_id) == (nv - 1) + 1 + PATCHES
    assert len(ids) == len(bb.encode_chat(msg, 1)) + nv
    pixels = pixels_of(bb, (200, 30, 30))
    vision = vision_prompts(bb, 1, nv)
    embeds = bb.embed(torch.tensor([ids]), pixels, Prompts(vision=vision))
    at_images = embeds[0, torch.tensor(ids) == bb.image_token_id]
    ref = bb.projector(reference_selected(bb, pixels, vision))[0]
    assert (at_images - ref).abs().max() <= 1e-5
    with pytest.raises(BadRequest, match="image tokens"):  # plain ids under a prompted plan
        bb.embed(torch.tensor([bb.encode_chat(msg, 1)]), pixels, Prompts(vision=vision))


def prompted_plan(bb: LlavaBackbone, seed: int) -> object:
    m = M2PT()
    cfg = m.config({"n_visual": 4, "n_text": 3})
    return m.materialize({k: v * 30 for k, v in m.init(bb, cfg, seed=seed).items()}, bb, cfg)


@torch.no_grad()
def test_prompted_left_padded_batch_equals_rows_alone_with_and_without_cache() -> None:
    bb = backbone()
    plan = prompted_plan(bb, 2)
    nv = plan.n_visual  # type: ignore[attr-defined]
    questions = ["what?", "describe the colour of the shape in a few words please."]
    rows = [bb.encode_chat(user_message(q, True), 1, nv) for q in questions]
    assert len(rows[0]) != len(rows[1]) and nv == 4
    pixels = pixels_of(bb, (250, 10, 10), (10, 120, 240))
    prompts = batch_prompts([plan, plan], bb.dtype)  # type: ignore[list-item]
    one = batch_prompts([plan], bb.dtype)  # type: ignore[list-item]
    batched = bb.greedy(rows, pixels, prompts, max_new_tokens=8)
    assert batched == bb.greedy(rows, pixels, prompts, max_new_tokens=8, use_cache=False)
    alone = [bb.greedy([r], pixels[i : i + 1], one, max_new_tokens=8) for i, r in enumerate(rows)]
    assert batched == [a[0] for a in alone]
    plain_rows = [bb.encode_chat(user_message(q, True), 1) for q in questions]
    assert batched != bb.greedy(plain_rows, pixels, max_new_tokens=8)


def test_engine_refuses_ids_encoded_for_another_plan_before_queueing() -> None:
    bb = backbone()
    plan = prompted_plan(bb, 3)
    pixels = pixels_of(bb, (9, 200, 9)).cpu()
    msg = user_message("what is in the image?", True)

    async def run() -> list[int]:
        engine = GenerationEngine(bb, max_batch_size=2, max_wait_ms=1)
        await engine.start()
        try:
            with pytest.raises(BadRequest, match="n_visual = 4"):
                await engine.complete(bb.encode_chat(msg, 1), pixels, plan, Sampling(2))  # type: ignore[arg-type]
            assert not engine.batches  # refused before it could fail a batch
            ids = bb.encode_chat(msg, 1, 4)
            tokens, _ = await engine.complete(ids, pixels, plan, Sampling(3))  # type: ignore[arg-type]
            return tokens
        finally:
            await engine.stop()

    assert len(asyncio.run(run())) <= 3
