"""What gets exported to ONNX, and how: the prompted vision tower and the text tower.

The vision tower is exported with its attention written as ONNX Runtime's fused
`com.microsoft.MultiHeadAttention` (one op per layer, emitted with `torch.onnx.ops.symbolic`).
A plain export of `nn.MultiheadAttention` leaves ~8 Transpose/Reshape/Slice nodes per layer that
ORT's transformer fusions do not recognise in the dynamo exporter's output (measured: ~9% of the
time at batch 32 went to Transpose alone); the fused op does the head split inside its kernel.
The query/key/value projection stays one large MatMul (MLAS is at its best on large GEMMs), and
its bias is folded into the attention op. Prompt tokens and biases stay graph inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.backbones import prompted
from service.backbones.clip import ClipBackbone
from service.backbones.prompted import Placement


def _attention(q: Tensor, k: Tensor, v: Tensor, in_bias: Tensor, heads: int) -> Tensor:
    """Eager meaning of MultiHeadAttention(q, k, v, bias): the same maths as nn.MultiheadAttention
    after its input projection (used outside export, so the module stays runnable)."""
    b, s, d = q.shape
    qb, kb, vb = in_bias.chunk(3)

    def heads_first(t: Tensor) -> Tensor:
        return t.reshape(b, -1, heads, d // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        heads_first(q + qb), heads_first(k + kb), heads_first(v + vb)
    )
    return out.transpose(1, 2).reshape(b, s, d)


class FusableBlock(nn.Module):
    """open_clip's `ResidualAttentionBlock` (self-attention, no mask) in a form that exports to
    one fused attention op; parameters are shared with the wrapped block, not copied."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b: Any = self.block
        attn = b.attn
        q, k, v = F.linear(b.ln_1(x), attn.in_proj_weight).chunk(3, dim=-1)
        if torch.onnx.is_in_onnx_export():
            out = torch.onnx.ops.symbolic(
                "com.microsoft::MultiHeadAttention",
                (q, k, v, attn.in_proj_bias),
                {"num_heads": int(attn.num_heads)},
                dtype=q.dtype,
                shape=q.shape,
                version=1,
            )
        else:
            out = _attention(q, k, v, attn.in_proj_bias, int(attn.num_heads))
        x = x + b.ls_1(attn.out_proj(out))
        return x + b.ls_2(b.mlp(b.ln_2(x)))


def fusable(block: nn.Module) -> bool:
    """Blocks the fused form reproduces exactly: open_clip's pre-norm, batch-first self-attention
    blocks with a packed input projection; any other block keeps the graph unfused."""
    attn = getattr(block, "attn", None)
    return (
        type(block).__name__ == "ResidualAttentionBlock"
        and isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn.in_proj_weight is not None
        and attn.in_proj_bias is not None
        and not hasattr(block, "ln_1_kv")
    )


def fused_visual(visual: Any) -> Any:
    """A shallow copy of the vision tower whose blocks are `FusableBlock`s (weights shared)."""
    blocks = visual.transformer.resblocks
    if not getattr(visual.transformer, "batch_first", False) or not all(fusable(b) for b in blocks):
        return visual
    # copy.copy shares a module's `_modules` dict: give each copy its own, or the assignments
    # below would rewire the served backbone itself (and change its fingerprint).
    out = copy.copy(visual)
    out._modules = dict(visual._modules)
    transformer = copy.copy(visual.transformer)
    transformer._modules = dict(visual.transformer._modules)
    transformer.resblocks = nn.ModuleList(FusableBlock(b) for b in blocks)
    out.transformer = transformer
    return out


class PromptedVision(nn.Module):
    """The vision tower with images, per-layer biases and (optionally) deep tokens as inputs."""

    def __init__(self, visual: nn.Module, placement: Placement, fused: bool = True) -> None:
        super().__init__()
        self.visual = fused_visual(visual) if fused else visual
        self.placement = placement

    def forward(self, images: Tensor, bias: Tensor, tokens: Tensor | None = None) -> Tensor:
        return prompted.encode_image(self.visual, images, tokens, bias, self.placement)


class TextTower(nn.Module):
    """Token ids `[N, T]` to text features. The causal-mask truncation that eager torch does with
    a data-dependent slice is done by the caller on the ids (see `truncate_ids`), so the graph has
    a dynamic T and no host round trip."""

    def __init__(self, backbone: ClipBackbone) -> None:
        super().__init__()
        self.parts = dataclasses.replace(backbone.text, causal=False)
        self.pool = backbone.text
        self.embedding = backbone.text.token_embedding

    def forward(self, ids: Tensor) -> Tensor:
        return prompted.encode_text(self.parts, self.embedding(ids), self.pool.pool_index(ids))


def truncate_ids(backbone: ClipBackbone, ids: Tensor) -> Tensor:
    """The ids eager torch's text forward actually runs: under a causal mask, positions after the
    last pooled token cannot change the pooled features, so they are dropped."""
    parts = backbone.text
    if parts.causal and parts.pool_type in ("argmax", "eos", "first"):
        return ids[:, : int(parts.pool_index(ids).max().item()) + 1]
    return ids


def _write(
    module: nn.Module, args: tuple[Tensor, ...], names: list[str], shapes: dict, path: Path
) -> None:
    """Export to `path` atomically (a concurrent or crashed export never leaves a torn graph)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=names,
            output_names=["features"],
            dynamic_shapes=shapes,
            dynamo=True,
            optimize=True,
            external_data=False,
            verbose=False,
        )
    tmp.replace(path)


def export_vision(
    backbone: ClipBackbone, depth: int, n: int, placement: Placement, path: Path, fused: bool = True
) -> None:
    """The prompted vision graph of one signature: inputs images, bias (+ tokens), dynamic batch."""
    module = PromptedVision(backbone.visual, placement, fused).eval()
    size = backbone.visual.image_size
    hw = size if isinstance(size, tuple) else (size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    args: tuple[Tensor, ...] = (
        torch.randn(2, 3, *hw),
        torch.zeros(2, backbone.vision_layers, backbone.vision_width),
    )
    shapes: dict[str, Any] = {"images": {0: batch}, "bias": {0: batch}}
    names = ["images", "bias"]
    if depth:
        args = (*args, torch.randn(2, depth, n, backbone.vision_width) * 0.02)
        shapes["tokens"] = {0: batch}
        names.append("tokens")
    _write(module, args, names, shapes, path)


def export_text(backbone: ClipBackbone, path: Path) -> None:
    """The text tower: token ids `[N, T]` (both dynamic) to unnormalized text features."""
    module = TextTower(backbone).eval()
    ids = backbone.tokenize(["a photo of a cat.", "a photo of a small dog."]).cpu()
    ids = truncate_ids(backbone, ids)
    rows = torch.export.Dim("rows", min=1, max=65536)
    length = torch.export.Dim("length", min=2, max=backbone.context_length)
    _write(module, (ids,), ["ids"], {"ids": {0: rows, 1: length}}, path)
