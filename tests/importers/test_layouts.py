"""The method is decided from the whole key set: one method explains the keys, or the importer
asks for --method; a chosen method that leaves a tensor unused is an error naming it."""

from __future__ import annotations

import pytest
import torch

from service.errors import (
    ExtraTensor,
    InvalidCheckpoint,
    InvalidContent,
    MalformedCheckpoint,
    MissingTensor,
)
from service.importers.layouts import choose_method, detect_method
from service.prompts.coop import class_token_position as coop_class_position

FROZEN = {"image_encoder.conv1.weight", "text_encoder.ln_final.weight", "logit_scale"}
ZS = {"prompt_learner.ZS_image_encoder.conv1.weight"}
BUFFERS = {"prompt_learner.token_prefix", "prompt_learner.token_suffix"}
TEXT_DEEP = {f"text_encoder.transformer.resblocks.{i}.VPT_shallow" for i in (1, 2)}
IMAGE_DEEP = {"image_encoder.VPT", "image_encoder.transformer.resblocks.1.VPT_shallow"}
MAPLE = {
    "prompt_learner.ctx",
    "prompt_learner.proj.weight",
    "prompt_learner.proj.bias",
    "prompt_learner.compound_prompts_text.0",
    "prompt_learner.compound_prompt_projections.0.weight",
    "prompt_learner.compound_prompt_projections.0.bias",
}
COCOOP = {
    "ctx",
    "meta_net.linear1.weight",
    "meta_net.linear1.bias",
    "meta_net.linear2.weight",
    "meta_net.linear2.bias",
}


@pytest.mark.parametrize(
    "keys, method",
    [
        ({"ctx", "token_prefix", "token_suffix"}, "coop"),
        (COCOOP | {"token_prefix", "token_suffix"}, "cocoop"),
        ({"prompt_learner." + k for k in COCOOP} | BUFFERS | FROZEN, "cocoop"),
        (MAPLE | BUFFERS | FROZEN, "maple"),
        (IMAGE_DEEP | FROZEN, "vpt"),
        ({"prompt_learner.ctx"} | TEXT_DEEP | IMAGE_DEEP | BUFFERS | FROZEN, "ivlp"),
        ({"prompt_learner.ctx"} | TEXT_DEEP | BUFFERS | FROZEN, "ivlp"),  # language only
        ({"prompt_learner.ctx"} | TEXT_DEEP | IMAGE_DEEP | BUFFERS | FROZEN | ZS, "promptsrc"),
        ({"prompt_learner.ctx"} | TEXT_DEEP | BUFFERS | FROZEN | ZS, "promptsrc"),
        ({"prompt_learner.ctx"} | IMAGE_DEEP | BUFFERS | FROZEN, "ivlp"),  # text depth 1
    ],
)
def test_each_reference_layout_has_one_method(keys, method):
    assert detect_method(keys) == method


@pytest.mark.parametrize(
    "keys, found",
    [
        # the frozen weights stripped: IVLP and PromptSRC save the same prompts
        ({"prompt_learner.ctx"} | TEXT_DEEP | IMAGE_DEEP, "ivlp or promptsrc"),
        # a whole-model text-only file: CoOp's context, or one-layer language-only IVLP
        ({"prompt_learner.ctx"} | BUFFERS | FROZEN, "coop or ivlp"),
    ],
)
def test_ambiguous_key_sets_ask_for_method(keys, found):
    with pytest.raises(InvalidCheckpoint, match=f"written by {found}; pass --method"):
        detect_method(keys)
    method = found.split(" or ")[-1]
    assert choose_method(keys, method) == method


def test_unused_tensors_are_errors_naming_them():
    language_only = {"prompt_learner.ctx"} | TEXT_DEEP | BUFFERS | FROZEN
    with pytest.raises(ExtraTensor, match=r"coop does not use .*resblocks\.1\.VPT_shallow"):
        choose_method(language_only, "coop")
    with pytest.raises(ExtraTensor, match=r"vpt does not use .*prompt_learner\.ctx.*those of ivlp"):
        choose_method(language_only | IMAGE_DEEP, "vpt")
    with pytest.raises(ExtraTensor, match=r"ivlp does not use .*ZS_image_encoder"):
        choose_method(language_only | ZS, "ivlp")
    with pytest.raises(MalformedCheckpoint, match=r"prompt_learner\.extra_head\.weight"):
        detect_method(MAPLE | {"prompt_learner.extra_head.weight"})
    with pytest.raises(ExtraTensor, match=r"maple does not use .*prompt_learner\.extra_head"):
        choose_method(MAPLE | {"prompt_learner.extra_head.weight"}, "maple")
    with pytest.raises(MalformedCheckpoint, match=r"unrecognized .*prompt_learner\.extra"):
        detect_method({"prompt_learner.ctx", "prompt_learner.extra"})


def test_missing_and_contradicted_tensors():
    with pytest.raises(MissingTensor, match=r"meta_net\.linear2\.bias"):
        choose_method(COCOOP - {"meta_net.linear2.bias"}, "cocoop")
    # the frozen CLIP without PromptSRC's frozen image tower: an IVLP run, not PromptSRC's
    with pytest.raises(InvalidCheckpoint, match="ZS_image_encoder"):
        choose_method({"prompt_learner.ctx"} | TEXT_DEEP | FROZEN, "promptsrc")
    with pytest.raises(InvalidCheckpoint, match="no Dassl importer"):
        choose_method({"ctx"}, "bias")


def test_detection_needs_only_keys():
    state = dict.fromkeys(MAPLE | BUFFERS, torch.zeros(1))
    assert detect_method(state) == "maple"


@pytest.mark.parametrize(
    "path, given, position",
    [
        ("out/eurosat/CoOp/vit_b16_16shots/nctx16_cscFalse_ctpmiddle/seed1/m.pth", None, "middle"),
        ("out/eurosat/CoOp/rn50/nctx16_cscTrue_ctpfront/seed2/prompt_learner/m.pth", None, "front"),
        ("nctx16_cscFalse_ctpmiddle/seed1/m.pth", "middle", "middle"),
        ("somewhere/model.pth.tar-50", None, "end"),
        ("somewhere/model.pth.tar-50", "front", "front"),
    ],
)
def test_coop_class_token_position(path, given, position):
    assert coop_class_position(path, given) == position


def test_coop_class_token_position_contradicting_the_run_directory():
    with pytest.raises(InvalidContent, match="ctpmiddle"):
        coop_class_position("nctx16_cscFalse_ctpmiddle/seed1/m.pth", "end")


def test_maple_prompts_beyond_its_depth_are_not_dropped():
    from service.importers.dassl import convert

    state = dict.fromkeys(MAPLE, torch.zeros(2, 4))
    state["prompt_learner.compound_prompt_projections.3.weight"] = torch.zeros(4, 4)
    with pytest.raises(ExtraTensor, match=r"compound_prompt_projections\.3\.weight"):
        convert(state, "maple")
    del state["prompt_learner.compound_prompts_text.0"]
    state["prompt_learner.compound_prompts_text.1"] = torch.zeros(2, 4)
    with pytest.raises(ExtraTensor, match=r"compound_prompts_text\.1"):  # not on layers 0..N-1
        convert(state, "maple")
