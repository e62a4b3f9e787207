"""Import M²PT checkpoints saved by the paper's public code (William-wAng618/M2PT).

That code (transformers 4.31, `train_PT.py`) ends with `trainer.save_model`, which writes the
*whole* model's state dict with `save_pretrained`: `pytorch_model.bin` or shards
`pytorch_model-0000N-of-0000M.bin` with `pytorch_model.bin.index.json` (safetensors only when the
run set `--save_safetensors`). The keys we read from it:

* `model.vision_tower.vision_tower.vision_model.encoder.prompts.{i}`: `[1, nv, d_vision]`, one per
  CLIP layer -> `visual_prompts[i]` for the layers up to and including the selected hidden state
  (with `vision_feature_layer` -2 that is every layer: the last layer's prompt is written into
  the selected state and its rows 1..nv-1 reach the projector as they are);
* `model.prompts.{i}`: `[1, nt, d_text]`, one per decoder layer -> `text_prompts[i]`;
* `model.mm_projector.{0,2}.{weight,bias}` (its `mlp2x_gelu` Sequential) -> `projector.linear_1.*`,
  `projector.linear_2.*` (transformers' LlavaMultiModalProjector); an adapter-only
  `mm_projector.bin` next to the weights is read too.

Only those tensors are taken from the (multi-gigabyte) files: safetensors are opened lazily,
torch files with `torch.load(weights_only=True, mmap=True)`; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from service.backbones.llava import LlavaBackbone
from service.checkpoints import BackboneRef, Checkpoint, Manifest, dump, load
from service.errors import InvalidContent, MalformedCheckpoint
from service.prompts.m2pt import M2PT, PROJECTOR_PREFIX

log = logging.getLogger(__name__)

VISION = re.compile(r"(?:^|\.)vision_model\.encoder\.prompts\.(\d+)$")
TEXT = re.compile(r"^(?:.*\.)?model\.prompts\.(\d+)$")
PROJECTOR = re.compile(r"(?:^|\.)mm_projector\.(\d+)\.(weight|bias)$")
LINEAR_PROJECTOR = re.compile(r"(?:^|\.)mm_projector\.(weight|bias)$")  # LLaVA v1: one Linear
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLES = ("model.safetensors", "pytorch_model.bin", "mm_projector.bin")


def _wanted(key: str) -> bool:
    return bool(
        VISION.search(key)
        or TEXT.match(key)
        or PROJECTOR.search(key)
        or LINEAR_PROJECTOR.search(key)
    )


def _read_file(path: Path) -> dict[str, Tensor]:
    """The M²PT tensors of one weights file (safetensors, or a weights-only torch file)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if _wanted(k)}  # noqa: SIM118
        except Exception as exc:
            raise MalformedCheckpoint(f"cannot read {path} as safetensors: {exc}") from exc
    try:
        try:  # mmap: a 7B shard is not read into memory to take a few prompt tensors from it
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MalformedCheckpoint(
            f"cannot read {path} as a weights-only torch file: {exc}"
        ) from exc
    if isinstance(obj, dict):
        obj = obj.get("state_dict", obj.get("module", obj))
    if not isinstance(obj, dict):
        raise MalformedCheckpoint(f"{path} holds no state dict")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor) and _wanted(k)}


def read_state(src: str | Path) -> dict[str, Tensor]:
    """M²PT tensors from a saved output directory (sharded or not) or from one weights file."""
    src = Path(src)
    if not src.exists():
        raise InvalidContent(f"{src} does not exist")
    if src.is_file():
        return _read_file(src)
    files: list[Path] = []
    for name in INDEXES:
        index = src / name
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise MalformedCheckpoint(f"{index} has no weight_map: {exc}") from exc
            shards = sorted({v for k, v in weight_map.items() if _wanted(k)})
            files += [src / Path(s).name for s in shards]  # never a path outside src
            break
    files += [src / n for n in SINGLES if (src / n).is_file() and src / n not in files]
    if not files:
        raise InvalidContent(
            f"{src} holds no model weights: expected {', '.join(INDEXES + SINGLES)} "
            "(the output directory of M2PT's train_PT.py)"
        )
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(_read_file(f))
    return state


def _stack(state: Mapping[str, Tensor], pattern: re.Pattern[str], which: str) -> Tensor | None:
    """Per-layer `[1, n, d]` prompts -> `[L, n, d]` float32 (layers must be 0..L-1)."""
    layers = {int(m.group(1)): v for k, v in state.items() if (m := pattern.search(k)) is not None}
    if not layers:
        return None
    if sorted(layers) != list(range(len(layers))):
        raise MalformedCheckpoint(f"{which} prompts are not on layers 0..N: {sorted(layers)}")
    tensors = [layers[i].detach().to(torch.float32) for i in range(len(layers))]
    if any(t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] != 1) for t in tensors):
        raise MalformedCheckpoint(f"{which} prompts must be [1, n, d] per layer")
    if len({tuple(t.shape[-2:]) for t in tensors}) != 1:
        raise MalformedCheckpoint(f"{which} prompts differ in shape between layers")
    out = torch.stack([t.reshape(t.shape[-2], t.shape[-1]) for t in tensors])
    return out.contiguous()


def _projector(state: Mapping[str, Tensor], backbone: LlavaBackbone) -> dict[str, Tensor]:
    """`mm_projector.{i}.*` (its Linear layers in order) -> our projector's Linear layers."""
    ref: dict[int, dict[str, Tensor]] = {}
    for k, v in state.items():
        if (m := PROJECTOR.search(k)) is not None:
            ref.setdefault(int(m.group(1)), {})[m.group(2)] = v
    ours: list[str] = []
    for key in backbone.projector_shapes():
        module = key.rsplit(".", 1)[0]
        if module not in ours:
            ours.append(module)
    if len(ref) != len(ours):
        raise InvalidContent(
            f"the reference projector has {len(ref)} linear layers, this backbone's has "
            f"{len(ours)} ({', '.join(ours)}); only an mlp2x_gelu projector maps onto LLaVA"
        )
    out = {}
    for module, index in zip(ours, sorted(ref), strict=True):
        for part, t in ref[index].items():
            out[f"{PROJECTOR_PREFIX}{module}.{part}"] = t.detach().to(torch.float32).contiguous()
    return out


def convert(
    state: Mapping[str, Tensor], backbone: LlavaBackbone, projector: str = "auto"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reference tensors -> (our m2pt parameters, our method config).

    The reference keeps a visual prompt for every CLIP layer; those of the layers run before the
    selected hidden state (`vision_feature_layer`) and the one written into that state change the
    image features, deeper ones (only with a feature layer shallower than -2) are dropped.
    `projector`: "auto" keeps it when it differs from the backbone's,
    "yes" always, "no" never.
    """
    if projector not in ("auto", "yes", "no"):
        raise InvalidContent("projector must be auto, yes or no")
    params: dict[str, Tensor] = {}
    config: dict[str, Any] = {"n_visual": 0, "n_text": 0, "train_projector": False}
    vision = _stack(state, VISION, "visual")
    if vision is not None:
        if len(vision) > backbone.vision_layers:
            log.warning(
                "dropping visual prompts of layers %d..%d: they lie past the selected state",
                backbone.vision_layers,
                len(vision) - 1,
            )
            vision = vision[: backbone.vision_layers].contiguous()
        params["visual_prompts"] = vision
        config.update(n_visual=int(vision.shape[1]), visual_depth=len(vision))
    text = _stack(state, TEXT, "textual")
    if text is not None:
        params["text_prompts"] = text
        config.update(n_text=int(text.shape[1]), text_depth=len(text))
    if not params:
        raise MalformedCheckpoint(
            "no M²PT prompts found: expected keys model.prompts.N and/or "
            "model.vision_tower.vision_tower.vision_model.encoder.prompts.N"
        )
    if projector != "no" and any(LINEAR_PROJECTOR.search(k) for k in state):
        # Never drop a trained projector silently: the prompts were trained against it.
        raise InvalidContent(
            "this checkpoint's projector is a single Linear (mm_projector.weight, LLaVA v1); "
            "transformers' LLaVA has a two-layer projector that cannot hold it. Pass "
            "--projector no to import the prompts alone (answers will then differ from the "
            "reference's, whose prompts were trained with that projector)"
        )
    has_proj = any(PROJECTOR.search(k) for k in state)
    if projector == "yes" and not has_proj:
        raise InvalidContent("--projector yes, but the checkpoint holds no mm_projector.* keys")
    if has_proj and projector != "no":
        proj = _projector(state, backbone)
        frozen = backbone.projector.state_dict()
        same = all(
            tuple(v.shape) == tuple(frozen[k.removeprefix(PROJECTOR_PREFIX)].shape)
            and torch.equal(v, frozen[k.removeprefix(PROJECTOR_PREFIX)].detach().float().cpu())
            for k, v in proj.items()
        )
        if projector == "yes" or not same:
            params.update(proj)
            config["train_projector"] = True
    return params, config


def import_m2pt(
    src: str | Path, *, name: str, backbone: LlavaBackbone, projector: str = "auto"
) -> tuple[Checkpoint, bytes]:
    """Convert a reference M²PT output into a validated promptserve checkpoint (and its bytes)."""
    if not isinstance(backbone, LlavaBackbone):
        raise InvalidContent("m2pt checkpoints import onto a LLaVA backbone: pass --backbone llava")
    params, config = convert(read_state(src), backbone, projector)
    try:
        manifest = Manifest(
            name=name,
            method=M2PT.name,
            method_config=config,
            backbone=BackboneRef(
                model=backbone.model_name,
                pretrained=backbone.pretrained,
                fingerprint=backbone.fingerprint,
            ),
            classnames=[],
            metrics={"imported_from": Path(src).name},
        )
    except ValidationError as exc:
        raise InvalidContent(f"invalid checkpoint name or manifest: {exc}") from exc
    data = dump(params, manifest)
    return load(data, backbone), data
