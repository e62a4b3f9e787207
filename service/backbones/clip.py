"""The frozen open_clip backbone: loaded once, fingerprinted, run under prompts.

Sources of weights: an open_clip pretrained tag (downloaded where the network allows), a local
file (`.safetensors` preferred, anything else through `torch.load(weights_only=True)`), or the
literal `none` (random weights: only when asked for by name, and logged loudly). A missing weight
is an error that names the fix; we never fall back to random weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import Tensor, nn
from torchvision.transforms import Compose, Normalize, ToTensor

from service.backbones import prompted
from service.backbones.base import Capability
from service.backbones.prompted import Placement, TextParts
from service.errors import BackboneError, WeightsUnavailable

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OFFLINE_FIX = (
    "Fix: pass --pretrained PATH to a local open_clip/OpenAI weights file (.safetensors "
    "preferred), or run the offline demo (`make demo`), which builds its own small backbone."
)


def register_model_config(path: str | Path) -> str:
    """Register a custom open_clip architecture from ARCH.json; returns its model name (ARCH)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackboneError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise BackboneError(
            f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)"
        )
    open_clip.add_model_config(path)
    return path.stem


def fingerprint_state(state: dict[str, Tensor]) -> str:
    """Hash of a backbone's weights (names, dtypes, shapes, bytes), independent of device."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


@dataclass
class ClipBackbone:
    """One frozen open_clip model with its tokenizer, preprocessing and fingerprint."""

    kind: ClassVar[str] = "clip"
    title: ClassVar[str] = "CLIP"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({"classify", "embed"})

    model: Any  # open_clip CLIP / CustomTextCLIP (its attributes are dynamic to mypy)
    model_name: str
    pretrained: str
    fingerprint: str
    tokenizer: Callable[..., Tensor]
    preprocess: Callable[[Any], Tensor]
    device: torch.device
    dtype: torch.dtype
    text_calls: int = field(default=0)  # counts text-tower passes: features must be cached

    def __post_init__(self) -> None:
        self.text = TextParts.of(self.model)
        self.visual: Any = self.model.visual
        self.is_vit = hasattr(self.visual, "class_embedding") and hasattr(
            self.visual.transformer, "resblocks"
        )

    def preprocess_config(self) -> dict[str, Any]:
        """open_clip's preprocessing config of the model: what a front-end process needs to build
        the same transform (`transform_of`) without the model."""
        return dict(get_model_preprocess_cfg(self.model))

    def describe(self) -> dict[str, str]:
        """What /readyz and the start-up log say about the backbone."""
        return {
            "backbone": self.model_name,
            "kind": self.kind,
            "pretrained": self.pretrained,
            "device": str(self.device),
            "fingerprint": self.fingerprint,
        }

    # --- dimensions the prompt methods declare their parameters against ---------------------
    @property
    def embed_dim(self) -> int:
        proj = self.text.text_projection
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        if isinstance(proj, Tensor):
            return int(proj.shape[1])
        return self.text_width

    @property
    def text_width(self) -> int:
        return int(self.text.token_embedding.weight.shape[1])

    @property
    def text_layers(self) -> int:
        return len(self.text.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return int(self.text.positional_embedding.shape[0])

    @property
    def vision_width(self) -> int:
        self._require_vit()
        return int(self.visual.class_embedding.shape[-1])

    @property
    def vision_layers(self) -> int:
        self._require_vit()
        return len(self.visual.transformer.resblocks)

    @property
    def image_size(self) -> tuple[int, int]:
        """The model's input `(height, width)` (its preprocessing's output)."""
        size = self.visual.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, tuple) else (int(size), int(size))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def _require_vit(self) -> None:
        if not self.is_vit:
            raise BackboneError(
                f"{self.model_name} has no ViT image tower: vision prompts need a ViT backbone"
            )

    # --- forward passes ---------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids `[N, context_length]` on the backbone's device."""
        return self.tokenizer(list(texts)).to(self.device)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Token embeddings `[N, T, text_width]` of token ids."""
        return self.text.token_embedding(ids.to(self.device))

    def encode_image(
        self,
        images: Tensor,
        tokens: Tensor | None = None,
        bias: Tensor | None = None,
        placement: Placement = "append",
    ) -> Tensor:
        """Image features (unnormalized) under per-sample deep tokens and per-layer biases."""
        images = images.to(self.device, self.dtype)
        if not self.is_vit:
            if tokens is not None or bias is not None:
                self._require_vit()
            return self.model.encode_image(images)
        return prompted.encode_image(self.visual, images, tokens, bias, placement)

    def encode_text_embeddings(
        self,
        embeddings: Tensor,
        pool_index: Tensor,
        tokens: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """Text features (unnormalized) of token embeddings under deep text tokens and biases."""
        self.text_calls += 1
        return prompted.encode_text(self.text, embeddings, pool_index, tokens, bias)

    def encode_text_ids(
        self, ids: Tensor, tokens: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor:
        """Text features (unnormalized) of token ids, optionally under prompts."""
        ids = ids.to(self.device)
        return self.encode_text_embeddings(
            self.embed_tokens(ids), self.text.pool_index(ids), tokens, bias
        )

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], batch: int = 256) -> Tensor:
        """Normalized plain text features `[N, embed_dim]` (float32), in chunks."""
        out = []
        for i in range(0, len(texts), batch):
            feats = self.encode_text_ids(self.tokenize(texts[i : i + batch]))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(out)


def _load_local_weights(model: nn.Module, path: str) -> None:
    try:
        # open_clip's loader: safetensors directly, anything else with weights_only=True, and
        # OpenAI / wrapped / DataParallel state dicts converted to open_clip's names.
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except Exception as exc:  # any failure here is the file's fault, not ours
        raise WeightsUnavailable(
            f"cannot load weights from {path} into {type(model).__name__}: {exc}. "
            "The file must be an open_clip or OpenAI CLIP state dict for the chosen --model."
        ) from exc


def load_clip(
    model_name: str,
    pretrained: str,
    *,
    model_config: str | Path | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> ClipBackbone:
    """Build the frozen backbone from a pretrained tag, a local file, or `none` (random)."""
    if model_config is not None:
        registered = register_model_config(model_config)
        model_name = model_name or registered
    if precision not in PRECISIONS:
        raise BackboneError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    if model_name not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model {model_name!r}; register a custom one with --model-config "
            "ARCH.json"
        )
    try:
        if pretrained == "none":
            log.warning(
                "RANDOM WEIGHTS: backbone %s built with --pretrained none; predictions are "
                "meaningless unless this backbone is trained (proving ground, tests, benchmarks)",
                model_name,
            )
            model = open_clip.create_model(model_name, pretrained=None)
        elif os.path.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin")):
            if not os.path.isfile(pretrained):
                raise WeightsUnavailable(f"weights file {pretrained} does not exist. {OFFLINE_FIX}")
            model = open_clip.create_model(model_name, pretrained=None)
            _load_local_weights(model, pretrained)
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise WeightsUnavailable(
                    f"{pretrained!r} is neither a file nor a pretrained tag of {model_name} "
                    f"(tags: {', '.join(tags) or 'none'}). {OFFLINE_FIX}"
                )
            model = _download(model_name, pretrained, cache_dir)
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(f"cannot build backbone {model_name}: {exc}") from exc

    fingerprint = fingerprint_state(model.state_dict())  # float32 weights: precision-independent
    dtype = PRECISIONS[precision]
    model = model.to(device=torch.device(device), dtype=dtype).eval()
    model.requires_grad_(False)
    backbone = ClipBackbone(
        model=model,
        model_name=model_name,
        pretrained=pretrained,
        fingerprint=fingerprint,
        tokenizer=open_clip.get_tokenizer(model_name),
        preprocess=transform_of(get_model_preprocess_cfg(model)),
        device=torch.device(device),
        dtype=dtype,
    )
    log.info(
        "backbone %s (%s) on %s/%s, fingerprint %s",
        model_name,
        pretrained,
        device,
        precision,
        fingerprint[:19],
    )
    return backbone


def _download(model_name: str, tag: str, cache_dir: str | None) -> nn.Module:
    try:
        return open_clip.create_model(model_name, pretrained=tag, cache_dir=cache_dir)
    except Exception as exc:
        raise WeightsUnavailable(
            f"could not obtain the {tag!r} weights of {model_name} (no network, or the download "
            f"failed: {exc}). {OFFLINE_FIX}"
        ) from exc


def transform_of(config: dict[str, Any], crop_only: bool = False) -> Callable[[Any], Tensor]:
    """The evaluation transform open_clip builds from a preprocessing config (PIL image in,
    normalized `[3, H, W]` float tensor out). `crop_only`: its PIL steps only (resize, crop,
    mode), as a `[3, H, W]` uint8 tensor: `normalizer(config)` finishes it bit for bit."""
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    full = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    if not crop_only:
        return full
    steps = full.transforms
    if not (isinstance(steps[-2], ToTensor) and isinstance(steps[-1], Normalize)):
        raise BackboneError(
            f"unexpected preprocessing (no ToTensor + Normalize at its end): {full}"
        )
    return Compose([*steps[:-2], _uint8_chw])


def _uint8_chw(image: Any) -> Tensor:
    """A PIL RGB image as `[3, H, W]` uint8: ToTensor's layout, before its float conversion."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalizer(config: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    """`[N, 3, H, W]` uint8 crops -> the model's normalized float32 input, with the operations
    torchvision's ToTensor and Normalize run, in their order (float, / 255, - mean, / std): the
    same numbers as the full transform, on whichever device the crops are."""
    mean = torch.tensor(config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(config["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(crops: Tensor) -> Tensor:
        x = crops.to(torch.float32).div(255)
        return x.sub_(mean.to(x.device)).div_(std.to(x.device))

    return normalize
