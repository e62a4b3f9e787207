"""Import Dassl `model.pth.tar-N` checkpoints of the public reference implementations.

KaiyangZhou/CoOp (CoOp, CoCoOp) save the prompt learner alone (`ctx`, `meta_net.*`,
`token_prefix`, `token_suffix`); muzairkhattak/multimodal-prompt-learning (MaPLe, IVLP, VPT) and
muzairkhattak/PromptSRC save the whole model (`prompt_learner.*`, `image_encoder.*VPT*`,
`text_encoder.*VPT_shallow`, plus the frozen CLIP, and for PromptSRC a frozen
`prompt_learner.ZS_image_encoder`). The layout is detected from the keys, never from the folder.
Files are read with `torch.load(weights_only=True)`; half-precision tensors are cast to float32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.checkpoints import Checkpoint, dump, load, new_manifest
from service.errors import InvalidContent, MalformedCheckpoint

DEEP = re.compile(r"^(image|text)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
PHRASE_METHODS = ("maple", "ivlp", "promptsrc")


def read_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a Dassl checkpoint (or a bare state dict), never unpickling code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MalformedCheckpoint(
            f"cannot read {path} as a weights-only torch file: {exc}"
        ) from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise MalformedCheckpoint(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_method(state: Mapping[str, Tensor]) -> str:
    """Which reference method saved this state dict, from its keys alone."""
    keys = set(state)
    if {"meta_net.linear1.weight", "prompt_learner.meta_net.linear1.weight"} & keys:
        return "cocoop"
    if any(".compound_prompts_text." in k for k in keys) or "prompt_learner.proj.weight" in keys:
        return "maple"
    if "image_encoder.VPT" in keys:
        text_deep = any(k.startswith("text_encoder.") and DEEP.match(k) for k in keys)
        if text_deep or "prompt_learner.ctx" in keys:
            zs = any(k.startswith("prompt_learner.ZS_image_encoder.") for k in keys)
            return "promptsrc" if zs else "ivlp"
        return "vpt"
    if {"ctx", "prompt_learner.ctx"} & keys:
        return "coop"
    raise MalformedCheckpoint(
        "unrecognized checkpoint layout: expected the keys of a CoOp, CoCoOp, MaPLe, VPT, "
        "IVLP or PromptSRC prompt learner"
    )


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def _deep_stack(state: Mapping[str, Tensor], tower: str, first: Tensor) -> Tensor:
    """Layer-0 prompt plus the per-block `VPT_shallow` prompts of blocks 1..depth-1."""
    layers = sorted(int(m.group(2)) for k in state if (m := DEEP.match(k)) and m.group(1) == tower)
    if layers != list(range(1, len(layers) + 1)):
        raise MalformedCheckpoint(f"{tower} deep prompts are not on blocks 1..N: {layers}")
    deeper = [state[f"{tower}_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in layers]
    return torch.stack([_f32(first), *(_f32(t) for t in deeper)])


def _coop_phrase(ctx_init: str | None, n_ctx: int) -> str:
    # CoOp/CoCoOp count the phrase's *words* as context; its extra BPE tokens (e.g. "itap" ->
    # "it ap") stay fixed in the prompt. Used only when given, and must fit the context.
    if not ctx_init:
        return ""
    words = len(ctx_init.split(" "))
    if words != n_ctx:
        raise InvalidContent(
            f"--ctx-init {ctx_init!r} has {words} words but the checkpoint has {n_ctx} context "
            "vectors; pass the run's CTX_INIT, or none for a randomly initialized context"
        )
    return ctx_init


def convert(
    state: Mapping[str, Tensor], method: str, ctx_init: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reference state dict -> (our parameters, our method config).

    `ctx_init` is the run's CTX_INIT: for CoOp/CoCoOp only when given; MaPLe, IVLP and
    PromptSRC default to their reference default, "a photo of a".
    """
    phrase = "a photo of a" if ctx_init is None else ctx_init
    s = {
        k.removeprefix("prompt_learner.") if method in ("coop", "cocoop") else k: v
        for k, v in state.items()
    }
    if method == "coop":
        ctx = _f32(s["ctx"])
        n = ctx.shape[-2]
        return {"ctx": ctx}, {
            "n_ctx": n,
            "csc": ctx.dim() == 3,
            "ctx_init": _coop_phrase(ctx_init, n),
        }
    if method == "cocoop":
        params = {k: _f32(v) for k, v in s.items() if k == "ctx" or k.startswith("meta_net.")}
        n = params["ctx"].shape[0]
        return params, {"n_ctx": n, "ctx_init": _coop_phrase(ctx_init, n)}
    if method == "maple":
        ctx = _f32(s["prompt_learner.ctx"])
        params = {
            "ctx": ctx,
            "proj.weight": _f32(s["prompt_learner.proj.weight"]),
            "proj.bias": _f32(s["prompt_learner.proj.bias"]),
        }
        depth = 1 + sum(1 for k in s if k.startswith("prompt_learner.compound_prompts_text."))
        if depth > 1:
            deeper = range(depth - 1)
            pre = "prompt_learner.compound_prompt"
            params["deep_text"] = torch.stack([_f32(s[f"{pre}s_text.{i}"]) for i in deeper])
            params["deep_proj.weight"] = torch.stack(
                [_f32(s[f"{pre}_projections.{i}.weight"]) for i in deeper]
            )
            params["deep_proj.bias"] = torch.stack(
                [_f32(s[f"{pre}_projections.{i}.bias"]) for i in deeper]
            )
        return params, {"n_ctx": ctx.shape[0], "depth": depth, "ctx_init": phrase}
    vision = _deep_stack(s, "image", s["image_encoder.VPT"])
    if method == "vpt":
        return {"vision_ctx": vision}, {
            "n_ctx_vision": vision.shape[1],
            "depth_vision": len(vision),
        }
    if method in ("ivlp", "promptsrc"):
        text = _deep_stack(s, "text", s["prompt_learner.ctx"])
        config = {
            "n_ctx_vision": vision.shape[1],
            "depth_vision": len(vision),
            "n_ctx_text": text.shape[1],
            "depth_text": len(text),
            "ctx_init": phrase,
        }
        return {"vision_ctx": vision, "text_ctx": text}, config
    raise InvalidContent(f"no Dassl importer for method {method!r}")


def import_dassl(
    src: str | Path,
    *,
    name: str,
    classnames: Sequence[str],
    backbone: ClipBackbone,
    method: str | None = None,
    ctx_init: str | None = None,
    class_token_position: str = "end",
) -> tuple[Checkpoint, bytes]:
    """Convert a reference checkpoint into a validated promptserve checkpoint (and its bytes)."""
    state = read_state(src)
    detected = detect_method(state)
    if method is not None and method != detected:
        raise InvalidContent(f"--method {method} given, but the keys are those of {detected}")
    params, config = convert(state, detected, ctx_init)
    if detected == "coop":
        config["class_token_position"] = class_token_position
    templates = ["a photo of a {}."] if detected == "vpt" else []
    manifest = new_manifest(
        name,
        detected,
        backbone,
        classnames,
        config,
        templates,
        metrics={"imported_from": Path(src).name},
    )
    data = dump(params, manifest)
    return load(data, backbone), data
