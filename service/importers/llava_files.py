"""Reading LLaVA v1-layout weights (the reference M²PT's saved model, LLaVA's releases, Vicuna).

LLaVA's `LlavaLlamaForCausalLM` (and M²PT's copy of it) saves its whole state dict with
`save_pretrained`: `pytorch_model.bin` or shards with `pytorch_model.bin.index.json` (safetensors
when the run asked for them). Its key names, and where each lives in the served base (transformers'
`LlavaForConditionalGeneration`):

| LLaVA v1 layout | served |
|---|---|
| `model.embed_tokens.*`, `model.layers.N.*`, `model.norm.*` | `model.language_model.*` |
| `lm_head.weight` | `lm_head.weight` |
| `model.mm_projector.{weight,bias}` (v1: one Linear) | `model.multi_modal_projector.linear_1.*` |
| `model.mm_projector.{0,2}.*` (1.5: `mlp2x_gelu`) | `...linear_1.*`, `...linear_2.*` |
| `model.vision_tower.vision_tower.vision_model.*` | `model.vision_tower.*` |
| `model.prompts.N`, `...vision_model.encoder.prompts.N` | M²PT's prompts (no base tensor) |

Files are read lazily (safetensors opened per tensor; torch files with `torch.load(weights_only=
True, mmap=True)`), so a 7B model is compared tensor by tensor, not loaded; nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.errors import InvalidContent, MalformedCheckpoint

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLES = ("model.safetensors", "pytorch_model.bin")
ADAPTER = "mm_projector.bin"  # LLaVA's projector-only save (the pretrain release ships it)
VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
SERVED_PROJECTOR = "model.multi_modal_projector."


def weight_files(src: Path) -> list[Path]:
    """The whole-model weight files of a saved directory (or the one file given)."""
    if not src.exists():
        raise InvalidContent(f"{src} does not exist")
    if src.is_file():
        return [src]
    for name in INDEXES:
        index = src / name
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise MalformedCheckpoint(f"{index} has no weight_map: {exc}") from exc
            return [src / Path(s).name for s in sorted(set(weight_map.values()))]  # never outside
    files = [src / n for n in SINGLES if (src / n).is_file()]
    if not files:
        raise InvalidContent(
            f"{src} holds no model weights: expected {', '.join(INDEXES + SINGLES)} (what "
            "save_pretrained writes; M2PT's train_PT.py saves the whole model so)"
        )
    return files


def tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor) of one weights file, one at a time (safetensors or a weights-only torch
    file, memory-mapped where it can be)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield key, f.get_tensor(key)
        except Exception as exc:
            raise MalformedCheckpoint(f"cannot read {path} as safetensors: {exc}") from exc
        return
    try:
        try:  # mmap: a 7B shard is paged in tensor by tensor, not read whole
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
    for key, value in obj.items():
        if isinstance(value, Tensor):
            yield str(key), value


def read_all(src: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a saved model (its shards in order), then of an `mm_projector.bin` beside
    it; a key saved twice with different values is an error, not a silent choice."""
    seen: dict[str, Tensor] = {}
    files = weight_files(src)
    if src.is_dir() and (src / ADAPTER).is_file():
        files.append(src / ADAPTER)
    for path in files:
        for key, value in tensors(path):
            if key in seen:
                if not torch.equal(seen[key], value):
                    raise MalformedCheckpoint(f"{key} is saved twice with different values")
                continue
            if key.startswith(PROJECTOR_PREFIX):  # small: kept to check a duplicate against
                seen[key] = value
            yield key, value


def config(src: Path) -> dict[str, Any]:
    """The saved model's config.json ({} when there is none, e.g. a single weights file)."""
    path = (src if src.is_dir() else src.parent) / "config.json"
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text())
    except ValueError as exc:
        raise MalformedCheckpoint(f"{path} is not JSON: {exc}") from exc
    if not isinstance(out, dict):
        raise MalformedCheckpoint(f"{path} is not a JSON object")
    return out


def served_key(key: str, served: dict[str, Any]) -> str | None:
    """Where a LLaVA v1-layout key lives in the served model's state dict (None: nowhere)."""
    candidates: list[str] = []
    if key == "lm_head.weight":
        candidates = [key]
    elif key.startswith(PROJECTOR_PREFIX):
        rest = key.removeprefix(PROJECTOR_PREFIX)
        layer, _, part = rest.rpartition(".")
        linear = {"": "linear_1", "0": "linear_1", "2": "linear_2"}.get(layer)
        candidates = [f"{SERVED_PROJECTOR}{linear}.{part}"] if linear else []
    elif key.startswith(VISION_PREFIX):
        rest = key.removeprefix(VISION_PREFIX)  # vision_model.embeddings....
        candidates = [f"model.vision_tower.{rest}", f"model.vision_tower.{_strip(rest)}"]
    elif key.startswith("model."):
        candidates = ["model.language_model." + key.removeprefix("model.")]
    return next((c for c in candidates if c in served), None)


def _strip(rest: str) -> str:
    return rest.removeprefix("vision_model.")
