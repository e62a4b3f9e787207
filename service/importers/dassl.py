"""Import Dassl `model.pth.tar-N` checkpoints of the public reference implementations.

KaiyangZhou/CoOp (CoOp, CoCoOp) save the prompt learner alone; muzairkhattak/multimodal-prompt-
learning (MaPLe, IVLP, VPT) and muzairkhattak/PromptSRC save the whole model. The file is read
without executing anything from it (service/importers/torchfile.py), the method is decided from
the whole key set (service/importers/layouts.py), the frozen CLIP tensors it carries are checked
against the served backbone (service/importers/frozen.py), and the prompts become our parameters
(half precision cast to float32) by the method's own `DasslLayout` (in its module).
docs/METHODS.md lists every reference config and what it maps to.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.checkpoints import Checkpoint, dump, load, new_manifest
from service.errors import MalformedCheckpoint
from service.importers.frozen import check_frozen
from service.importers.layouts import choose_method, layout
from service.importers.layouts import detect_method as detect_method
from service.importers.torchfile import read_torch_file

log = logging.getLogger(__name__)


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


def convert(
    state: Mapping[str, Tensor], method: str, ctx_init: str | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Reference state dict -> (our parameters, our method config), by the method's layout.

    `ctx_init` is the run's CTX_INIT: for CoOp/CoCoOp only when given; MaPLe, IVLP and
    PromptSRC default to their reference default, "a photo of a".
    """
    return layout(method).convert(state, ctx_init)


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
    lay = layout(chosen)
    params, config = lay.convert(state, ctx_init)
    config |= lay.run_config(src, {"class_token_position": class_token_position})
    templates = list(lay.templates)
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
