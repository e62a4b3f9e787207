"""What a method declares to import the Dassl checkpoints of its reference implementation.

The reference prompt learners (KaiyangZhou/CoOp; muzairkhattak/multimodal-prompt-learning and
muzairkhattak/PromptSRC) are Dassl trainers; their `model.pth.tar-N` files hold a state dict.
What each method's file holds and how it maps onto the method's parameters is the method's own
knowledge: its module declares a `DasslLayout` (its `importer`). service/importers reads the
files safely, decides which method wrote one from the whole key set by asking every declared
layout, checks the frozen CLIP tensors, and writes our checkpoint.

Keys after Dassl strips `module.`:
- the prompt learner alone (CoOp, CoCoOp): its parameters and its buffers `token_prefix`,
  `token_suffix`;
- the whole model (MaPLe, VPT, IVLP, PromptSRC): the prompt learner under `prompt_learner.`, the
  deep prompts `{image,text}_encoder.transformer.resblocks.i.VPT_shallow`, VPT's layer-0 prompt
  `image_encoder.VPT`, and the frozen CLIP (`image_encoder.*`, `text_encoder.*`, `logit_scale`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from service.errors import InvalidContent, MalformedCheckpoint, MissingTensor, ShapeMismatch

DEEP = re.compile(r"^(image|text)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
ZS_PREFIX = "prompt_learner.ZS_image_encoder."  # PromptSRC's frozen zero-shot image tower
LEARNER = "prompt_learner."
BUFFERS = ("token_prefix", "token_suffix")
Converted = tuple[dict[str, Tensor], dict[str, Any]]


def backbone_key(key: str) -> str | None:
    """The open_clip name of a frozen CLIP tensor a whole-model reference saves, else None."""
    if key == "logit_scale":
        return key
    if key.startswith(ZS_PREFIX):
        return "visual." + key.removeprefix(ZS_PREFIX)
    if "VPT" in key:  # image_encoder.VPT and every VPT_shallow are prompts
        return None
    if key.startswith("image_encoder."):
        return "visual." + key.removeprefix("image_encoder.")
    if key.startswith("text_encoder."):
        return key.removeprefix("text_encoder.")
    return None


def deep_keys(keys: Iterable[str], tower: str) -> set[str]:
    """The `VPT_shallow` prompts of one tower ("image" or "text")."""
    return {k for k in keys if (m := DEEP.match(k)) and m.group(1) == tower}


def f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def take(state: Mapping[str, Tensor], key: str) -> Tensor:
    """A tensor of the file as float32 (MissingTensor naming it when absent)."""
    if key not in state:
        raise MissingTensor(f"the checkpoint lacks tensor {key!r}")
    return f32(state[key])


def stack_layers(first: Tensor, deeper: Sequence[tuple[str, Tensor]], what: str) -> Tensor:
    """Layer-0 prompt and the deeper ones `[(key, tensor)]` -> `[L, ...]` (shapes must agree)."""
    for key, t in deeper:
        if tuple(t.shape) != tuple(first.shape):
            raise ShapeMismatch(
                f"{what} prompt {key!r} has shape {list(t.shape)}; layer 0 has {list(first.shape)}"
            )
    return torch.stack([first, *(f32(t) for _, t in deeper)])


def deep_stack(state: Mapping[str, Tensor], tower: str, first: Tensor) -> Tensor:
    """Layer-0 prompt plus the per-block `VPT_shallow` prompts of blocks 1..depth-1."""
    layers = sorted(int(m.group(2)) for k in state if (m := DEEP.match(k)) and m.group(1) == tower)
    if layers != list(range(1, len(layers) + 1)):
        raise MalformedCheckpoint(f"{tower} deep prompts are not on blocks 1..N: {layers}")
    keys = [f"{tower}_encoder.transformer.resblocks.{i}.VPT_shallow" for i in layers]
    return stack_layers(first, [(k, state[k]) for k in keys], tower)


def learner(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The prompt learner's keys as it names them, saved alone or inside the whole model."""
    return {k.removeprefix(LEARNER): v for k, v in state.items()}


def context_phrase(ctx_init: str | None, n_ctx: int) -> str:
    """CoOp-style CTX_INIT: its *words* are the context (extra BPE tokens of the phrase stay fixed
    in the prompt). Used only when given, and must fit the file's context."""
    if not ctx_init:
        return ""
    words = len(ctx_init.split(" "))
    if words != n_ctx:
        raise InvalidContent(
            f"--ctx-init {ctx_init!r} has {words} words but the checkpoint has {n_ctx} context "
            "vectors; pass the run's CTX_INIT, or none for a randomly initialized context"
        )
    return ctx_init


class DasslLayout:
    """How one method's reference trainer saved its prompts, and how they become our parameters.

    A layout *explains* a key set when every key is one it trains, one of its buffers or a frozen
    CLIP tensor, and its required keys are there (service/importers/layouts.py asks every one).
    """

    reference: ClassVar[str] = "Dassl"  # which code's files it reads
    title: ClassVar[str]  # what the reference calls the method, for messages
    templates: ClassVar[tuple[str, ...]] = ()  # the manifest's templates (a fixed text side)
    zero_shot_tower: ClassVar[bool] = False  # saves a frozen CLIP image tower under ZS_PREFIX

    def prefix(self, keys: set[str]) -> str:
        """`prompt_learner.` for whole-model saves, "" for the prompt learner saved alone."""
        return LEARNER

    def prompt_keys(self, keys: set[str], prefix: str) -> tuple[list[str], set[str]]:
        """(the keys it requires, every key it trains) of this key set."""
        raise NotImplementedError

    def buffers(self, prefix: str) -> set[str]:
        """Keys of the prompt learner's frozen buffers (checked, never imported)."""
        return {prefix + b for b in BUFFERS}

    def frozen_ok(self, keys: set[str]) -> str | None:
        """Why the frozen tensors present contradict this method (None: they do not)."""
        return None

    def averaged_epochs(self, epoch: object) -> int:
        """Over how many epochs the file's frozen tensors were averaged (1: copied as loaded)."""
        return 1

    def convert(self, state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
        """Reference state dict -> (our parameters, our method config)."""
        raise NotImplementedError

    def run_config(self, src: str | Path, options: Mapping[str, Any]) -> dict[str, Any]:
        """Config the file does not hold but its run does (from the path or the options)."""
        return {}


class PromptLearnerLayout(DasslLayout):
    """A method whose trainer may save its prompt learner alone (CoOp, CoCoOp)."""

    def prefix(self, keys: set[str]) -> str:
        return "" if "ctx" in keys else LEARNER
