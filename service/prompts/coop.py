"""CoOp (Zhou et al., IJCV 2022; KaiyangZhou/CoOp): learnable text context, frozen CLIP.

Unified context `ctx [n, d]` or class-specific `ctx [C, n, d]`; the class token at the end,
middle or front of the prompt; initialization from a phrase ("a photo of a"). The defaults are the
published ones: 16 context tokens, unified, class token at the end, random init.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.errors import InvalidContent, ShapeMismatch
from service.prompts.base import (
    PromptMethod,
    context_size,
    ctx_prefix,
    normalize,
    phrase_length,
    phrase_vectors,
    prompt_text,
    readable,
)
from service.prompts.dassl import (
    Converted,
    PromptLearnerLayout,
    context_phrase,
    learner,
    take,
)
from service.prompts.method import MethodConfig, Params
from service.prompts.recipe import Recipe

log = logging.getLogger(__name__)
# scripts/coop/main.sh names its output directory nctx{N}_csc{B}_ctp{P}: the one place the class
# token position of a CoOp run is written down (the checkpoint does not hold it)
COOP_RUN_DIR = re.compile(r"^nctx\d+_csc(True|False)_ctp(end|middle|front)$")


class CoOpConfig(MethodConfig):
    n_ctx: int = Field(default=16, ge=1, le=64)
    csc: bool = False
    class_token_position: Literal["end", "middle", "front"] = "end"
    ctx_init: str = Field(default="", max_length=200)


def context_prompts(
    backbone: ClipBackbone,
    ctx: Tensor,
    classnames: Sequence[str],
    ctx_init: str,
    position: str = "end",
) -> Tensor:
    """Text features `[C, e]` (normalized) with learned context around each class name."""
    n_ctx = ctx.shape[-2]
    text = prompt_text(backbone, classnames, ctx_prefix(backbone, n_ctx, ctx_init))
    n_cls = len(classnames)
    ctx = ctx.to(backbone.device)
    if position == "end":
        tokens = ctx[:, None] if ctx.dim() == 3 else ctx[None]
        feats = backbone.encode_text_embeddings(text.embeddings, text.pool_index, tokens=tokens)
        return normalize(feats)
    ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(n_cls, -1, -1)
    emb = text.embeddings
    prefix, suffix = emb[:, :1], emb[:, 1 + n_ctx :]
    rows = []
    half = n_ctx // 2
    for i, name in enumerate(classnames):
        name_len = phrase_length(backbone, readable(name))
        cls_tok, rest = suffix[i : i + 1, :name_len], suffix[i : i + 1, name_len:]
        c = ctx[i : i + 1].to(emb.dtype)
        if position == "middle":
            parts = [prefix[i : i + 1], c[:, :half], cls_tok, c[:, half:], rest]
        else:  # front
            parts = [prefix[i : i + 1], cls_tok, c, rest]
        rows.append(torch.cat(parts, dim=1))
    feats = backbone.encode_text_embeddings(torch.cat(rows), text.pool_index)
    return normalize(feats)


def class_token_position(src: str | Path, given: str | None) -> str:
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


class CoOpLayout(PromptLearnerLayout):
    """KaiyangZhou/CoOp's prompt learner: `ctx` (`[n, d]`, or `[C, n, d]` class-specific)."""

    title = "CoOp"

    def prompt_keys(self, keys: set[str], prefix: str) -> tuple[list[str], set[str]]:
        return [prefix + "ctx"], {prefix + "ctx"}

    def convert(self, state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
        ctx = take(learner(state), "ctx")
        if ctx.dim() not in (2, 3):
            raise ShapeMismatch(f"ctx has shape {list(ctx.shape)}; CoOp's is [n, d] or [C, n, d]")
        n = ctx.shape[-2]
        config = {"n_ctx": n, "csc": ctx.dim() == 3, "ctx_init": context_phrase(ctx_init, n)}
        return {"ctx": ctx}, config

    def run_config(self, src: str | Path, options: Mapping[str, Any]) -> dict[str, Any]:
        given = options.get("class_token_position")
        return {"class_token_position": class_token_position(src, given)}


class CoOp(PromptMethod[CoOpConfig]):
    name = "coop"
    Config = CoOpConfig
    recipe = Recipe(lr=0.002, epochs=50, batch_size=32)
    source = "Zhou et al., Learning to Prompt for Vision-Language Models (IJCV 2022)"
    importer = CoOpLayout()
    # 16 tokens barely move the proving ground's small CLIP
    proving_config: ClassVar[Mapping[str, Any]] = {"n_ctx": 4}

    def shapes(
        self, backbone: ClipBackbone, cfg: CoOpConfig, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        n, d = context_size(cfg), backbone.text_width
        return {"ctx": (len(classnames), n, d) if cfg.csc else (n, d)}

    def init(
        self, backbone: ClipBackbone, cfg: CoOpConfig, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        params = super().init(backbone, cfg, classnames, seed)
        if cfg.ctx_init:
            vec = phrase_vectors(backbone, cfg.ctx_init, context_size(cfg))
            params["ctx"] = vec.expand_as(params["ctx"]).clone()
        return params

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: CoOpConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        return context_prompts(
            backbone, params["ctx"], classnames, cfg.ctx_init, cfg.class_token_position
        )
