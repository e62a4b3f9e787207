"""Loading the frozen LLaVA: a local directory, the hub, or random weights from a config.

`--pretrained none` builds random weights from the config in `--model` (only when asked for by
name, logged loudly), a local directory is read with `from_pretrained` (what
`promptserve convert-base` writes), anything else downloads `--model` from the Hugging Face hub
where the network allows. A missing weight is an error that names the fix; we never fall back to
random weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from service.backbones.llava import LlavaBackbone
from service.errors import BackboneError, WeightsUnavailable

log = logging.getLogger(__name__)

OFFLINE_FIX = (
    "Fix: pass --pretrained PATH to a local directory saved by transformers' save_pretrained "
    "(a LLaVA model with its processor), or --pretrained none with --model CONFIG_DIR for random "
    "weights (tests and benchmarks only)."
)


def load_llava(
    model_name: str,
    pretrained: str,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> LlavaBackbone:
    """Build the frozen LLaVA from a local directory, the hub, or `none` (random, from a config)."""
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    source = pretrained if os.path.isdir(pretrained) else model_name
    if not source:
        raise BackboneError(f"--model must name a LLaVA directory or hub id. {OFFLINE_FIX}")
    local = os.path.isdir(source)
    if not local and (os.path.sep in source and not source.count("/") == 1):
        raise WeightsUnavailable(f"LLaVA directory {source} does not exist. {OFFLINE_FIX}")
    kwargs: dict[str, Any] = {"cache_dir": cache_dir, "local_files_only": local}
    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        if pretrained == "none":
            log.warning(
                "RANDOM WEIGHTS: LLaVA %s built with --pretrained none; answers are meaningless "
                "(tests, benchmarks)",
                model_name,
            )
            model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(source, **kwargs))
        else:
            model = LlavaForConditionalGeneration.from_pretrained(
                source, dtype=torch.float32, **kwargs
            )
    except (OSError, ValueError) as exc:
        raise WeightsUnavailable(
            f"could not load LLaVA {source!r} (missing files, no network, or not a LLaVA "
            f"checkpoint: {exc}). {OFFLINE_FIX}"
        ) from exc
    backbone = LlavaBackbone(
        model, processor, model_name or source, pretrained, device=device, precision=precision
    )
    log.info(
        "LLaVA %s (%s) on %s/%s, fingerprint %s",
        backbone.model_name,
        pretrained,
        device,
        precision,
        backbone.fingerprint[:19],
    )
    return backbone
