"""Import M²PT runs saved by the paper's public code (William-wAng618/M2PT) onto the served base.

`train_PT.py` freezes only `model.model`, re-creates `lm_head.weight` as a trainable parameter,
trains the one-Linear `mm_projector` when `--tune_mm_mlp_adapter` is set (the official recipe,
`scripts/PT_full_schedule.sh`, sets it and `--tune_lm_header`), and ends with
`trainer.save_model`: the WHOLE model's state dict, in bf16 (llava_files.py has the layout). So
every tensor of the saved model is compared with the served base's, where it lives there:

* M²PT's prompts (`model.prompts.N` `[1, nt, d]`, `...encoder.prompts.N` `[1, nv, d]`) are
  imported as `text_prompts` `[Lt, nt, d]` and `visual_prompts` `[Lv, nv, d]`;
* a tensor equal to the base's (a frozen part) is skipped. Equal means bit-equal at the coarser
  of the two dtypes, through the casts the reference applies (bf16; the vision tower passes fp16
  first), so a trained tensor is never mistaken for a frozen one;
* a projector or output head that differs is imported (the checkpoint carries it);
* anything else that differs (or has no place in the served model) would be lost: the import
  fails naming it, unless `--drop PATTERN` drops it on purpose, which the manifest records;
* a shape that differs, or a config.json that describes another architecture, is a base mismatch.

The manifest records the conversation template the run used (`llava_v1` by default: the
reference evaluates with it) and the base the run's config names.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from service.backbones.conversation import template
from service.backbones.llava import LlavaBackbone
from service.checkpoints import Checkpoint, dump, load, new_manifest
from service.errors import BackboneMismatch, InvalidContent, MalformedCheckpoint
from service.importers import llava_files
from service.prompts.m2pt import HEAD, M2PT, PROJECTOR_PREFIX, M2PTOutput

log = logging.getLogger(__name__)

OUTPUT = M2PTOutput()  # the method's own declaration of the reference's saved layout
ANOTHER_BASE = 0.5  # more than this share of the frozen tensors differ: trained on another base
SHOWN = 5


@dataclass
class Comparison:
    """What the tensor-by-tensor comparison with the served base found."""

    prompts: dict[str, Tensor] = field(default_factory=dict)  # reference key -> tensor
    trained: dict[str, Tensor] = field(default_factory=dict)  # our param name -> tensor
    frozen: int = 0  # base tensors compared (projector and head excluded)
    equal: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # differ, nowhere to go
    unknown: list[str] = field(default_factory=list)  # no place in the served model
    architecture: list[str] = field(default_factory=list)  # how it differs from the served one
    dropped: list[dict[str, Any]] = field(default_factory=list)
    sources: set[torch.dtype] = field(default_factory=set)  # dtypes of what is imported


def same(saved: Tensor, served: Tensor) -> bool:
    """Bit-equal at the coarser dtype, directly or through fp16 first (the reference casts its
    fp32 CLIP to fp16, then trains in bf16: bf16(fp16(x)) can differ from bf16(x) by one unit)."""
    if not (saved.is_floating_point() and served.is_floating_point()):
        return torch.equal(saved, served.to(saved.dtype))
    coarse = max((saved.dtype, served.dtype), key=lambda d: torch.finfo(d).eps)
    a, b = saved.detach().to(coarse), served.detach().to("cpu", coarse)
    hit = a == b
    if coarse == torch.bfloat16 and not bool(hit.all()):
        hit |= a == served.detach().to("cpu", torch.float16).to(coarse)
    return bool(hit.all())


def compare(
    src: Path, backbone: LlavaBackbone, drop: Sequence[str] = (), layout: M2PTOutput = OUTPUT
) -> Comparison:
    """Every tensor of the saved model against the served base (see the module docstring)."""
    served = backbone.model.state_dict()
    out = Comparison(architecture=architecture(llava_files.config(src), backbone))
    forms: set[str] = set()
    for key, tensor in llava_files.read_all(src):
        if key.startswith(llava_files.PROJECTOR_PREFIX):
            forms.add("mlp" if key.count(".") > 2 else "one Linear")
        if layout.is_prompt(key):
            out.prompts[key] = tensor
            continue
        target = llava_files.served_key(key, served)
        if target is None:
            if not tensor.is_floating_point() or key.endswith((".inv_freq", ".position_ids")):
                continue  # derived buffers (position ids, rotary frequencies): never trained
            _lose(out, out.unknown, key, tensor, drop, "has no place in the served model")
            continue
        base = served[target]
        if tuple(tensor.shape) != tuple(base.shape):
            out.architecture.append(f"{key} {list(tensor.shape)} (served {list(base.shape)})")
            continue
        ours = layout.parameter(target, backbone)
        out.frozen += ours is None
        if same(tensor, base):
            out.equal.append(key)
        elif ours is not None and not _matches(key, drop):
            out.trained[ours] = tensor
            out.sources.add(tensor.dtype)
        else:
            _lose(out, out.lost, key, tensor, drop, _what(key, tensor, base))
    served_form = "one Linear" if backbone.one_linear else "mlp"
    if forms - {served_form}:
        out.architecture.append(f"a {'/'.join(forms)} projector (served: {served_form})")
    return out


def architecture(cfg: Mapping[str, Any], backbone: LlavaBackbone) -> list[str]:
    """How the run's config.json differs from the served base (LLaVA's `mm_*` fields)."""
    if "mm_hidden_size" not in cfg:
        return []  # not a LLaVA config: the tensors' shapes and keys still say
    one_linear = cfg.get("mm_projector_type", "linear") == "linear"
    strategy = {"patch": "default", "cls_patch": "full"}.get(
        str(cfg.get("mm_vision_select_feature"))
    )
    served = {
        "hidden_size": backbone.text_width,
        "num_hidden_layers": backbone.text_layers,
        "vocab_size": backbone.head_shape[0],
        "mm_hidden_size": backbone.vision_width,
        "mm_vision_select_layer": backbone.model.config.vision_feature_layer,
    }
    out = [f"{k} {cfg[k]} (served {v})" for k, v in served.items() if k in cfg and cfg[k] != v]
    if one_linear != backbone.one_linear:
        out.append(f"mm_projector_type {cfg.get('mm_projector_type', 'linear')} (served "
                   f"{'one Linear' if backbone.one_linear else 'two layers'})")  # fmt: skip
    if strategy is not None and strategy != backbone.strategy:
        out.append(f"mm_vision_select_feature {cfg['mm_vision_select_feature']}")
    return out


def _matches(key: str, drop: Sequence[str]) -> str | None:
    return next((p for p in drop if fnmatch.fnmatchcase(key, p)), None)


def _what(key: str, tensor: Tensor, base: Tensor) -> str:
    diff = (tensor.float() - base.detach().cpu().float()).abs()
    changed = float((diff > 0).float().mean())
    return f"differs from the base ({changed:.1%} of its values, by up to {float(diff.max()):.3g})"


def _lose(
    out: Comparison, bucket: list[str], key: str, tensor: Tensor, drop: Sequence[str], why: str
) -> None:
    if (pattern := _matches(key, drop)) is not None:
        out.dropped.append(
            {"tensor": key, "shape": list(tensor.shape), "why": why, "dropped_by": pattern}
        )
    else:
        bucket.append(f"{key} {list(tensor.shape)} {why}")


def check(result: Comparison, backbone: LlavaBackbone, src: Path) -> None:
    """Refuse another base, and any trained tensor that would be lost, naming them."""
    named = _base_named(llava_files.config(src))
    where = f"the served base is {backbone.model_name} ({backbone.fingerprint[:19]}...)"
    if result.architecture:
        raise BackboneMismatch(
            f"{src} was trained on another architecture{named}: {_list(result.architecture)}; "
            f"{where}. Convert that run's base with `promptserve convert-base` and serve it"
        )
    if not result.frozen:
        raise InvalidContent(
            f"{src} holds none of the base's frozen tensors, so its base cannot be checked; "
            "import the whole saved model (the output directory of M2PT's train_PT.py)"
        )
    if len(result.lost) > ANOTHER_BASE * result.frozen:
        raise BackboneMismatch(
            f"{src} was trained on another base{named}: {len(result.lost)} of its "
            f"{result.frozen} frozen tensors differ from the served one's (e.g. "
            f"{_list(result.lost)}); {where}. Serve the base it was trained on (convert it with "
            "`promptserve convert-base`)"
        )
    if result.lost or result.unknown:
        raise InvalidContent(
            f"importing {src} would lose trained tensors that M²PT cannot carry (it serves "
            f"prompts, projector and output head on a frozen base): "
            f"{_list(result.lost + result.unknown)}. Pass --drop PATTERN (e.g. --drop "
            "'model.layers.*') to import without them; the manifest then records what was dropped"
        )


def _list(items: Sequence[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + more


def _base_named(cfg: Mapping[str, Any]) -> str:
    names = [str(cfg[k]) for k in ("_name_or_path", "mm_vision_tower") if cfg.get(k)]
    return f" (its config names {' + '.join(names)})" if names else ""


def _stack(state: Mapping[str, Tensor], pattern: re.Pattern[str], which: str) -> Tensor | None:
    """Per-layer `[1, n, d]` prompts -> `[L, n, d]` (layers must be 0..L-1)."""
    layers = {int(m.group(1)): v for k, v in state.items() if (m := pattern.search(k)) is not None}
    if not layers:
        return None
    if sorted(layers) != list(range(len(layers))):
        raise MalformedCheckpoint(f"{which} prompts are not on layers 0..N: {sorted(layers)}")
    tensors = [layers[i].detach() for i in range(len(layers))]
    if any(t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] != 1) for t in tensors):
        raise MalformedCheckpoint(f"{which} prompts must be [1, n, d] per layer")
    if len({tuple(t.shape[-2:]) for t in tensors}) != 1:
        raise MalformedCheckpoint(f"{which} prompts differ in shape between layers")
    return torch.stack([t.reshape(t.shape[-2], t.shape[-1]) for t in tensors]).contiguous()


def convert(
    result: Comparison, backbone: LlavaBackbone, layout: M2PTOutput = OUTPUT
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The comparison's trained tensors -> (our m2pt parameters, our method config).

    The reference keeps a visual prompt for every CLIP layer; those past the selected hidden
    state (only with a `vision_feature_layer` shallower than -2) never reach the answer and are
    recorded as dropped, with that reason.
    """
    params: dict[str, Tensor] = {}
    config: dict[str, Any] = {"n_visual": 0, "n_text": 0}
    vision = _stack(result.prompts, layout.visual, "visual")
    if vision is not None:
        keep = backbone.vision_layers
        for i in range(keep, len(vision)):
            result.dropped.append(
                {"tensor": f"visual prompts of layer {i}", "shape": list(vision.shape[1:]),
                 "why": "past the selected vision state: no effect on the answer",
                 "dropped_by": "the served base's vision_feature_layer"}
            )  # fmt: skip
        params["visual_prompts"] = vision[:keep].contiguous()
        config.update(n_visual=int(vision.shape[1]), visual_depth=min(keep, len(vision)))
    text = _stack(result.prompts, layout.text, "textual")
    if text is not None:
        params["text_prompts"] = text
        config.update(n_text=int(text.shape[1]), text_depth=len(text))
    if not params:
        raise MalformedCheckpoint(
            "no M²PT prompts found: expected keys model.prompts.N and/or "
            "model.vision_tower.vision_tower.vision_model.encoder.prompts.N"
        )
    projector = {k: v for k, v in result.trained.items() if k.startswith(PROJECTOR_PREFIX)}
    if projector and set(projector) != {PROJECTOR_PREFIX + k for k in backbone.projector_shapes()}:
        for key in backbone.projector_shapes():  # part of it trained: carry all of it
            full = PROJECTOR_PREFIX + key
            projector.setdefault(full, backbone.projector.state_dict()[key].detach().cpu())
    params.update(projector)
    if HEAD in result.trained:
        params[HEAD] = result.trained[HEAD]
    sources = result.sources | {t.dtype for t in result.prompts.values()}
    dtype = torch.bfloat16 if sources == {torch.bfloat16} else torch.float32  # exact either way
    config.update(train_projector=bool(projector), train_head=HEAD in params, dtype=str(dtype)[6:])
    return {k: v.to(dtype).contiguous() for k, v in params.items()}, config


def import_m2pt(
    src: str | Path,
    *,
    name: str,
    backbone: LlavaBackbone,
    drop: Sequence[str] = (),
    conversation: str = "llava_v1",
    layout: M2PTOutput = OUTPUT,
    method: str = M2PT.name,
) -> tuple[Checkpoint, bytes]:
    """Convert a reference M²PT output into a validated promptserve checkpoint (and its bytes);
    `layout` is the importing method's hook (`method`'s `importer`)."""
    if not isinstance(backbone, LlavaBackbone):
        raise InvalidContent("m2pt checkpoints import onto a LLaVA backbone: pass --backbone llava")
    src = Path(src)
    result = compare(src, backbone, drop, layout)
    check(result, backbone, src)
    params, config = convert(result, backbone, layout)
    if conversation != "none":
        config["conversation"] = template(conversation).model_dump()
    cfg = llava_files.config(src)
    metrics: dict[str, Any] = {
        "imported_from": src.name,
        "trained_on": {k: cfg[k] for k in ("_name_or_path", "mm_vision_tower") if k in cfg},
        "equal_to_base": len(result.equal),
        "imported": sorted(params),
    }
    try:
        manifest = new_manifest(
            name, method, backbone, [], config, metrics=metrics, dropped=result.dropped
        )
    except ValidationError as exc:
        raise InvalidContent(f"invalid checkpoint name or manifest: {exc}") from exc
    data = dump(params, manifest)
    log.info(
        "imported %s: %s; %d tensors equal to the base skipped, %d dropped on purpose",
        src, ", ".join(sorted(params)), len(result.equal), len(result.dropped),
    )  # fmt: skip
    return load(data, backbone), data
