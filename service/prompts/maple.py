"""MaPLe (Khattak et al., CVPR 2023; muzairkhattak/multimodal-prompt-learning).

Text context `ctx [n, d_t]` and deeper text prompts `deep_text [depth-1, n, d_t]`; the vision
prompts are their projections: layer 0 gets `proj(ctx)`, layer j gets `deep_proj[j-1](deep_text
[j-1])`, so once trained they are fixed tensors and the Plan carries them like any deep tokens.
Defaults from the paper: depth 9, 2 context tokens initialized from "a photo of a" (the rest of
the phrase, "of a", stays as fixed words in the text prompt, as in the reference).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from service.backbones.clip import ClipBackbone
from service.errors import ExtraTensor
from service.prompts.base import (
    PromptMethod,
    ctx_prefix,
    default_linears,
    normalize,
    phrase_vectors,
    prompt_text,
)
from service.prompts.dassl import LEARNER, Converted, DasslLayout, take
from service.prompts.method import MethodConfig, Params
from service.prompts.recipe import Recipe


class MaPLeConfig(MethodConfig):
    n_ctx: int = Field(default=2, ge=1, le=64)
    depth: int = Field(default=9, ge=1, le=64)
    ctx_init: str = Field(default="a photo of a", max_length=200)


def _depth(backbone: ClipBackbone, cfg: MaPLeConfig) -> int:
    # Depth counts layers of both towers; a smaller backbone caps it at its own layer count.
    return min(int(cfg.depth), backbone.vision_layers, backbone.text_layers)


def _uses_phrase(cfg: MaPLeConfig) -> bool:
    return bool(cfg.ctx_init) and cfg.n_ctx <= 4


class MaPLeLayout(DasslLayout):
    """The whole model: `prompt_learner.ctx`, `proj.*`, and per deeper layer i
    `compound_prompts_text.i` and `compound_prompt_projections.i.*`."""

    title = "MaPLe"
    DEEP = re.compile(
        r"^prompt_learner\.compound_prompt(s_text\.\d+|_projections\.\d+\.(weight|bias))$"
    )

    def prompt_keys(self, keys: set[str], prefix: str) -> tuple[list[str], set[str]]:
        required = [prefix + k for k in ("ctx", "proj.weight", "proj.bias")]
        return required, set(required) | {k for k in keys if self.DEEP.match(k)}

    def convert(self, state: Mapping[str, Tensor], ctx_init: str | None) -> Converted:
        pre = LEARNER
        ctx = take(state, pre + "ctx")
        params = {
            "ctx": ctx,
            "proj.weight": take(state, pre + "proj.weight"),
            "proj.bias": take(state, pre + "proj.bias"),
        }
        depth = 1 + sum(1 for k in state if k.startswith(pre + "compound_prompts_text."))
        deeper = range(depth - 1)
        proj = [f"{pre}compound_prompt_projections.{i}" for i in deeper]
        expected = {f"{pre}compound_prompts_text.{i}" for i in deeper}
        expected |= {p + suffix for p in proj for suffix in (".weight", ".bias")}
        unused = sorted(
            k for k in state if k.startswith(pre + "compound_prompt") and k not in expected
        )
        if unused:
            raise ExtraTensor(f"maple prompts beyond its {depth} layers: {', '.join(unused)}")
        if depth > 1:
            text = [take(state, f"{pre}compound_prompts_text.{i}") for i in deeper]
            params["deep_text"] = torch.stack(text)
            params["deep_proj.weight"] = torch.stack([take(state, p + ".weight") for p in proj])
            params["deep_proj.bias"] = torch.stack([take(state, p + ".bias") for p in proj])
        phrase = "a photo of a" if ctx_init is None else ctx_init
        return params, {"n_ctx": ctx.shape[0], "depth": depth, "ctx_init": phrase}


class MaPLe(PromptMethod[MaPLeConfig]):
    name = "maple"
    Config = MaPLeConfig
    recipe = Recipe(lr=0.0035, epochs=5, batch_size=4)
    source = "Khattak et al., MaPLe: Multi-modal Prompt Learning (CVPR 2023)"
    importer = MaPLeLayout()

    def shapes(
        self, backbone: ClipBackbone, cfg: MaPLeConfig, classnames: Sequence[str]
    ) -> dict[str, tuple[int, ...]]:
        depth = _depth(backbone, cfg)
        n, dt, dv = cfg.n_ctx, backbone.text_width, backbone.vision_width
        shapes: dict[str, tuple[int, ...]] = {
            "ctx": (n, dt),
            "proj.weight": (dv, dt),
            "proj.bias": (dv,),
        }
        if depth > 1:
            deeper = depth - 1
            shapes |= {
                "deep_text": (deeper, n, dt),
                "deep_proj.weight": (deeper, dv, dt),
                "deep_proj.bias": (deeper, dv),
            }
        return shapes

    def init(
        self, backbone: ClipBackbone, cfg: MaPLeConfig, classnames: Sequence[str], seed: int = 0
    ) -> dict[str, Tensor]:
        params = super().init(backbone, cfg, classnames, seed)
        dt, dv = backbone.text_width, backbone.vision_width
        layers = default_linears(seed, dt, dv, _depth(backbone, cfg))
        params["proj.weight"] = layers[0].weight.detach().clone()
        params["proj.bias"] = layers[0].bias.detach().clone()
        if len(layers) > 1:
            params["deep_proj.weight"] = torch.stack([m.weight.detach() for m in layers[1:]])
            params["deep_proj.bias"] = torch.stack([m.bias.detach() for m in layers[1:]])
        if _uses_phrase(cfg):
            params["ctx"] = phrase_vectors(backbone, cfg.ctx_init, cfg.n_ctx)
        return params

    def text_tokens(self, params: Params) -> Tensor:
        """Text deep tokens `[depth, n, d_t]`: the context, then the deeper text prompts."""
        ctx = params["ctx"][None]
        return torch.cat([ctx, params["deep_text"]]) if "deep_text" in params else ctx

    def vision_prompts(
        self, params: Params, backbone: ClipBackbone, cfg: MaPLeConfig
    ) -> tuple[Tensor | None, Tensor | None]:
        first = nn.functional.linear(params["ctx"], params["proj.weight"], params["proj.bias"])
        layers = [first[None]]
        if "deep_text" in params:
            deep = torch.einsum("lnt,lvt->lnv", params["deep_text"], params["deep_proj.weight"])
            layers.append(deep + params["deep_proj.bias"][:, None])
        return torch.cat(layers), None

    def class_embeddings(
        self,
        params: Params,
        backbone: ClipBackbone,
        cfg: MaPLeConfig,
        classnames: Sequence[str],
        templates: Sequence[str],
    ) -> Tensor:
        prefix = ctx_prefix(backbone, cfg.n_ctx, cfg.ctx_init if _uses_phrase(cfg) else "")
        text = prompt_text(backbone, classnames, prefix)
        feats = backbone.encode_text_embeddings(
            text.embeddings, text.pool_index, tokens=self.text_tokens(params)
        )
        return normalize(feats)
