"""The one prompted forward of open_clip's towers.

Every prompt method reduces, at serving time, to per-sample deep tokens and per-layer biases;
these two functions are the only place they enter the transformer. With no tokens and no biases
they compute exactly what open_clip's `encode_image` / `encode_text` compute (tests hold them to
1e-5), because they call the same modules in the same order.

Token placement, as the reference implementations do it:
- vision "append" (VPT-deep, IVLP, PromptSRC, MaPLe; muzairkhattak/multimodal-prompt-learning):
  layer-0 tokens are concatenated after the patch tokens *before* `ln_pre`; at layers 1..L-1 the
  last n tokens are replaced; from layer L on they are carried as the transformer left them.
- vision "prepend" (M²PT): layer-0 tokens are put before the class token *after* `ln_pre`;
  at layers 1..L-1 the first n tokens are replaced.
- text: layer-0 tokens overwrite positions [1, 1+n) of the token embeddings (before the positional
  embedding is added, as CoOp's prompt construction does); at layers 1..L-1 the hidden states at
  those positions are replaced (MaPLe, IVLP). The sequence length and the EOT index never change.
Biases: `bias[:, l]` is added to every token at the input of layer l, for l < bias layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

Placement = Literal["append", "prepend"]
PLACEMENTS: tuple[str, ...] = ("append", "prepend")


def _per_sample(t: Tensor | None, batch: int, rank: int) -> Tensor | None:
    """Broadcast a shared `[L, ...]` prompt tensor to `[B, L, ...]`; pass batched ones through."""
    if t is None:
        return None
    if t.dim() == rank - 1:
        return t.unsqueeze(0).expand(batch, *t.shape)
    if t.dim() != rank or t.shape[0] != batch:
        raise ValueError(f"prompt tensor of shape {tuple(t.shape)} does not fit batch {batch}")
    return t


def _blocks(transformer: Any) -> nn.ModuleList:
    return transformer.resblocks


def _run_block(transformer: nn.Module, block: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    # open_clip >= 2.24 runs batch-first; older releases keep LND inside the stack.
    if getattr(transformer, "batch_first", True):
        return block(x, attn_mask=mask)
    return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)


def encode_image(
    visual: Any,
    images: Tensor,
    tokens: Tensor | None = None,
    bias: Tensor | None = None,
    placement: Placement = "append",
) -> Tensor:
    """Image features (unnormalized) of open_clip's `VisionTransformer` under per-sample prompts.

    `tokens`: `[B, L, n, width]` or shared `[L, n, width]`;
    `bias`: `[B, Lb, width]` or shared `[Lb, width]`.
    """
    batch = images.shape[0]
    tokens = _per_sample(tokens, batch, 4)
    bias = _per_sample(bias, batch, 3)
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    n = 0
    if tokens is not None:
        tokens = tokens.to(x.dtype)
        n = tokens.shape[2]
        if placement == "append":
            x = visual.ln_pre(torch.cat([x, tokens[:, 0]], dim=1))
        elif placement == "prepend":
            x = torch.cat([tokens[:, 0], visual.ln_pre(x)], dim=1)
        else:
            raise ValueError(f"unknown placement {placement!r}")
    else:
        x = visual.ln_pre(x)
    depth = 0 if tokens is None else tokens.shape[1]
    bias_depth = 0 if bias is None else bias.shape[1]
    for i, block in enumerate(_blocks(visual.transformer)):
        if tokens is not None and 0 < i < depth:
            if placement == "append":
                x = torch.cat([x[:, :-n], tokens[:, i]], dim=1)
            else:
                x = torch.cat([tokens[:, i], x[:, n:]], dim=1)
        if bias is not None and i < bias_depth:
            x = x + bias[:, i, None, :].to(x.dtype)
        x = _run_block(visual.transformer, block, x, None)
    if n:
        # Drop the prompt tokens before pooling so every pooling mode sees the backbone's layout.
        x = x[:, :-n] if placement == "append" else x[:, n:]
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


@dataclass(frozen=True)
class TextParts:
    """The modules of a CLIP text tower, wherever open_clip keeps them (CLIP vs CustomTextCLIP)."""

    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: Any
    ln_final: Any
    text_projection: Tensor | nn.Module | None
    attn_mask: Tensor | None
    pool_type: str
    eos_id: int | None
    causal: bool

    @classmethod
    def of(cls, model: nn.Module) -> TextParts:
        """Find the text tower's parts; refuse layouts the prompted forward does not handle."""
        text: Any = getattr(model, "text", model)
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            raise ValueError("text towers with a class token or padding mask are not supported")
        pool_type = str(
            getattr(text, "pool_type", None) or getattr(model, "text_pool_type", "argmax")
        )
        eos_id = getattr(text, "eos_id", None) or getattr(model, "text_eos_id", None)
        mask = text.attn_mask
        causal = (
            mask is not None
            and mask.dim() == 2
            and bool(
                torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1))
            )
        )
        return cls(
            causal=causal,
            token_embedding=text.token_embedding,
            positional_embedding=text.positional_embedding,
            transformer=text.transformer,
            ln_final=text.ln_final,
            text_projection=text.text_projection,
            attn_mask=text.attn_mask,
            pool_type=pool_type,
            eos_id=eos_id,
        )

    def pool_index(self, ids: Tensor) -> Tensor:
        """Index of the pooled token per sequence (EOT for OpenAI CLIP), from the token ids."""
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        if self.pool_type == "eos" and self.eos_id is not None:
            return (ids == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full_like(ids[:, 0], ids.shape[1] - 1)
        if self.pool_type == "first":
            return torch.zeros_like(ids[:, 0])
        raise ValueError(f"text pool type {self.pool_type!r} is not supported")


def encode_text(
    parts: TextParts,
    embeddings: Tensor,
    pool_index: Tensor,
    tokens: Tensor | None = None,
    bias: Tensor | None = None,
    start: int = 1,
) -> Tensor:
    """Text features (unnormalized) from token *embeddings* `[N, T, width]` under prompts.

    `tokens`: `[N, L, n, width]` or shared `[L, n, width]`, written at positions [start, start+n);
    `bias`: `[N, Lb, width]` or `[Lb, width]`.
    """
    cast = parts.transformer.get_cast_dtype()
    if parts.causal and parts.pool_type in ("argmax", "eos", "first"):
        # Under a causal mask the pooled token never sees the padding after it: run only up to
        # the longest prompt (about 10 of 77 tokens for class prompts, a 5-7x saving).
        embeddings = embeddings[:, : int(pool_index.max().item()) + 1]
    batch, length = embeddings.shape[:2]
    tokens = _per_sample(tokens, batch, 4)
    bias = _per_sample(bias, batch, 3)
    x = embeddings.to(cast)
    n = 0 if tokens is None else tokens.shape[2]
    if tokens is not None:
        tokens = tokens.to(cast)
        x = torch.cat([x[:, :start], tokens[:, 0], x[:, start + n :]], dim=1)
    x = x + parts.positional_embedding[:length].to(cast)
    mask = parts.attn_mask
    if mask is not None:
        mask = mask[:length, :length]
    depth = 0 if tokens is None else tokens.shape[1]
    bias_depth = 0 if bias is None else bias.shape[1]
    for i, block in enumerate(_blocks(parts.transformer)):
        if tokens is not None and 0 < i < depth:
            x = torch.cat([x[:, :start], tokens[:, i], x[:, start + n :]], dim=1)
        if bias is not None and i < bias_depth:
            x = x + bias[:, i, None, :].to(x.dtype)
        x = _run_block(parts.transformer, block, x, mask)
    x = parts.ln_final(x)
    pooled = x[torch.arange(batch, device=x.device), pool_index.to(x.device)]
    proj = parts.text_projection
    if isinstance(proj, nn.Module):
        return proj(pooled)
    if proj is not None:
        return pooled @ proj
    return pooled
