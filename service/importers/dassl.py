"""Import Dassl `model.pth.tar-N` checkpoints of the public reference implementations.

KaiyangZhou/CoOp (CoOp, CoCoOp) save the prompt learner alone; muzairkhattak/multimodal-prompt-
learning (MaPLe, IVLP, VPT) and muzairkhattak/PromptSRC save the whole model. The file is read
without executing anything from it (service/importers/torchfile.py), the method is decided from
the whole key set (service/importers/layouts.py), the frozen CLIP tensors it carries are checked
against the served backbone (service/importers/frozen.py), and the prompts become our parameters
(half precision cast to float32). docs/METHODS.md lists every reference config and what it maps to.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.checkpoints import Checkpoint, dump, load, new_manifest
from service.errors import (
    ExtraTensor,
    InvalidContent,
    MalformedCheckpoint,
    MissingTensor,
    ShapeMismatch,
)
from service.importers.frozen import check_frozen
from service.importers.layouts import DEEP, choose_method
from service.importers.layouts import detect_method as detect_method
from service.importers.torchfile import read_torch_file

log = logging.getLogger(__name__)

# scripts/coop/main.sh names its output directory nctx{N}_csc{B}_ctp{P}: the one place the class
# token position of a CoOp run is written down (the checkpoint does not hold it)
COOP_RUN_DIR = re.compile(r"^nctx\d+_csc(True|False)_ctp(end|middle|front)$")
Converted = tuple[dict[str, Tensor], dict[str, Any]]
Converter = Callable[[Mapping[str, Tensor], str | None], Converted]


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], object]:
    """(state dict, the `epoch` Dassl stored or None) of a Dassl checkpoint or a bare state dict."""
    obj = read_torch_file(path)
    epoch = None
    if isinstance(obj, dict) and "state_dict" in obj:
        state, epoch = obj["state_dict"], obj.get("epoch")
    else:
        state = obj
    if not isinstance(state, dict):
        raise MalformedCheckpoint(f"{path} holds no state dict")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise MalformedCheckpoint(f"{path}: state dict entry {key!r} is not a named tensor")
        name = key.removeprefix("module.")  # DataParallel's prefix, if Dassl left it
        if name in out:
            raise MalformedCheckpoint(f"{path} holds {name!r} both with and without 'module.'")
        out[name] = value
    return out, epoch


def read_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a Dassl checkpoint (or a bare state dict), never executing its pickle."""
    return read_checkpoint(path)[0]


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def _take(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise MissingTensor(f"the checkpoint lacks tensor {key!r}")
    return _f32(state[key])


def _stack(first: Tensor, deeper: Sequence[tuple[str, Tensor]], what: str) -> Tensor:
    for key, t in deeper:
        if tuple(t.shape) != tuple(first.shape):
            raise ShapeMismatch(
                f"{what} prompt {key!r} has shape {list(t.shape)}; layer 0 has {list(first.shape)}"
            )
    return torch.stack([first, *(_f32(t) for _, t in deeper)])


def _deep_stack(state: Mapping[str, Tensor], tower: str, first: Tensor) -> Tensor:
    """Layer-0 prompt plus the per-block `VPT_shallow` prompts of blocks 1..depth-1."""
    layers = sorted(int(m.group(2)) for k in state if (m := DEEP.match(k)) and m.group(1) == tower)
    if layers != list(range(1, len(layers) + 1)):
        raise MalformedCheckpoint(f"{tower} deep prompts are not on blocks 1..N: {layers}")
    keys = [f"{tower}_encoder.transformer.resblocks.{i}.VPT_shallow" for i in layers]
    return _stack(first, [(k, state[k]) for k in keys], tower)


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


def _learner(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # CoOp/CoCoOp keys as the prompt learner names them, saved alone or inside the whole model
    return {k.removeprefix("prompt_learner."): v for k, v in state.items()}


def _coop(state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
    ctx = _take(_learner(state), "ctx")
    if ctx.dim() not in (2, 3):
        raise ShapeMismatch(f"ctx has shape {list(ctx.shape)}; CoOp's is [n, d] or [C, n, d]")
    n = ctx.shape[-2]
    return {"ctx": ctx}, {"n_ctx": n, "csc": ctx.dim() == 3, "ctx_init": _coop_phrase(ctx_init, n)}


def _cocoop(state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
    s = _learner(state)
    params = {k: _f32(v) for k, v in s.items() if k == "ctx" or k.startswith("meta_net.")}
    n = _take(s, "ctx").shape[0]
    return params, {"n_ctx": n, "ctx_init": _coop_phrase(ctx_init, n)}


def _maple(state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
    pre = "prompt_learner."
    ctx = _take(state, pre + "ctx")
    params = {
        "ctx": ctx,
        "proj.weight": _take(state, pre + "proj.weight"),
        "proj.bias": _take(state, pre + "proj.bias"),
    }
    depth = 1 + sum(1 for k in state if k.startswith(pre + "compound_prompts_text."))
    deeper = range(depth - 1)
    proj = [f"{pre}compound_prompt_projections.{i}" for i in deeper]
    expected = {f"{pre}compound_prompts_text.{i}" for i in deeper}
    expected |= {p + suffix for p in proj for suffix in (".weight", ".bias")}
    unused = sorted(k for k in state if k.startswith(pre + "compound_prompt") and k not in expected)
    if unused:
        raise ExtraTensor(f"maple prompts beyond its {depth} layers: {', '.join(unused)}")
    if depth > 1:
        text = [_take(state, f"{pre}compound_prompts_text.{i}") for i in deeper]
        params["deep_text"] = torch.stack(text)
        params["deep_proj.weight"] = torch.stack([_take(state, p + ".weight") for p in proj])
        params["deep_proj.bias"] = torch.stack([_take(state, p + ".bias") for p in proj])
    phrase = "a photo of a" if ctx_init is None else ctx_init
    return params, {"n_ctx": ctx.shape[0], "depth": depth, "ctx_init": phrase}


def _vpt(state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
    vision = _deep_stack(state, "image", _take(state, "image_encoder.VPT"))
    return {"vision_ctx": vision}, {"n_ctx_vision": vision.shape[1], "depth_vision": len(vision)}


def _ivlp(state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
    """IVLP and PromptSRC; without `image_encoder.VPT` the run prompted language only
    (PROMPT_DEPTH_VISION 0, as the reference's `_4ctx_language_only` config)."""
    text = _deep_stack(state, "text", _take(state, "prompt_learner.ctx"))
    params = {"text_ctx": text}
    n_vision = depth_vision = 0
    if "image_encoder.VPT" in state:
        vision = _deep_stack(state, "image", _take(state, "image_encoder.VPT"))
        params["vision_ctx"] = vision
        n_vision, depth_vision = vision.shape[1], len(vision)
    elif any((m := DEEP.match(k)) and m.group(1) == "image" for k in state):
        raise MissingTensor("deeper image prompts without image_encoder.VPT, the layer-0 prompt")
    return params, {
        "n_ctx_vision": n_vision,
        "depth_vision": depth_vision,
        "n_ctx_text": text.shape[1],
        "depth_text": len(text),
        "ctx_init": "a photo of a" if ctx_init is None else ctx_init,
    }


CONVERTERS: dict[str, Converter] = {
    "coop": _coop,
    "cocoop": _cocoop,
    "maple": _maple,
    "vpt": _vpt,
    "ivlp": _ivlp,
    "promptsrc": _ivlp,
}


def convert(
    state: Mapping[str, Tensor], method: str, ctx_init: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reference state dict -> (our parameters, our method config).

    `ctx_init` is the run's CTX_INIT: for CoOp/CoCoOp only when given; MaPLe, IVLP and
    PromptSRC default to their reference default, "a photo of a".
    """
    if method not in CONVERTERS:
        raise InvalidContent(f"no Dassl importer for method {method!r}")
    return CONVERTERS[method](state, ctx_init)


def coop_class_position(src: str | Path, given: str | None) -> str:
    """CoOp's CLASS_TOKEN_POSITION: the flag, else the run directory's `ctp`, else "end"."""
    found = {m.group(2) for part in Path(src).parts if (m := COOP_RUN_DIR.match(part))}
    if given is not None:
        if found and found != {given}:
            raise InvalidContent(
                f"--class-token-position {given}, but the run directory says ctp{found.pop()}"
            )
        return given
    if len(found) > 1:
        raise InvalidContent(f"the run directories say ctp{' and ctp'.join(sorted(found))}: pass "
                             "--class-token-position")  # fmt: skip
    if found:
        position = found.pop()
        log.info("class token position %r, from the run directory's name", position)
        return position
    log.info("class token position 'end' (the file does not store it; pass the run's CTP)")
    return "end"


def import_dassl(
    src: str | Path,
    *,
    name: str,
    classnames: Sequence[str],
    backbone: ClipBackbone,
    method: str | None = None,
    ctx_init: str | None = None,
    class_token_position: str | None = None,
) -> tuple[Checkpoint, bytes]:
    """Convert a reference checkpoint into a validated promptserve checkpoint (and its bytes)."""
    state, epoch = read_checkpoint(src)
    chosen = choose_method(state, method)
    check_frozen(state, backbone, chosen, epoch)
    params, config = convert(state, chosen, ctx_init)
    if chosen == "coop":
        config["class_token_position"] = coop_class_position(src, class_token_position)
    templates = ["a photo of a {}."] if chosen == "vpt" else []
    manifest = new_manifest(
        name,
        chosen,
        backbone,
        classnames,
        config,
        templates,
        metrics={"imported_from": Path(src).name},
    )
    data = dump(params, manifest)
    return load(data, backbone), data
