"""Mixed-checkpoint batches: one encoder pass per plan signature, one matrix product per plan.

Samples whose plans share a `Signature` run in one encoder pass with their prompt tensors
gathered per sample (`[B, L, n, d]`, `[B, L, d]`); plans without biases ride along with zero
biases (a no-op), so text-only and bias-only plans share the plain pass.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.engine.runtimes.base import Runtime
from service.prompts.plans import Plan, Signature

K = TypeVar("K", bound=Hashable)


def group(plans: Sequence[Plan], key: Callable[[Plan], K]) -> dict[K, list[int]]:
    """Indices of the plans per `key` (first appearance order; indices ascending): THE grouping
    of the classify path, by `signature` (one encoder pass), `vision_key` (one encode per
    request) or identity (one class-matrix product)."""
    groups: dict[K, list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault(key(plan), []).append(i)
    return groups


def signature(plan: Plan) -> Signature:
    """Plans of one signature share an encoder pass."""
    return plan.signature


def gather_prompts(plans: Sequence[Plan]) -> tuple[Tensor | None, Tensor | None]:
    """Per-sample tokens `[B, L, n, d]` and biases `[B, Lmax, d]` of plans of one signature; the
    plan's own `[L, n, d]` / `[L, d]` when every row holds the same ones (the common case: one
    checkpoint per batch), which the forward and the runtimes broadcast instead of copying."""
    first = plans[0]
    if all(p.vision_tokens is first.vision_tokens and p.vision_bias is first.vision_bias
           for p in plans):  # fmt: skip
        return first.vision_tokens, first.vision_bias
    tokens = None
    if plans[0].vision_tokens is not None:
        tokens = torch.stack([p.vision_tokens for p in plans])  # type: ignore[misc]
    biased = [p.vision_bias for p in plans if p.vision_bias is not None]
    if not biased:
        return tokens, None
    depth = max(b.shape[0] for b in biased)
    bias = biased[0].new_zeros(len(plans), depth, biased[0].shape[1])
    for i, p in enumerate(plans):
        if p.vision_bias is not None:
            bias[i, : p.vision_bias.shape[0]] = p.vision_bias
    return tokens, bias


@torch.no_grad()
def encode(
    backbone: ClipBackbone, images: Tensor, plans: Sequence[Plan], runtime: Runtime | None = None
) -> Tensor:
    """Normalized image features `[B, e]` (float32), sample i under `plans[i]`'s vision prompts,
    through `runtime` (eager torch when none is given)."""
    if len(plans) != images.shape[0]:
        raise ValueError("one plan per image")
    out: Tensor | None = None
    for sig, idx in group(plans, signature).items():
        tokens, bias = gather_prompts([plans[i] for i in idx])
        index = torch.tensor(idx, device=images.device)
        placement = sig.placement
        chunk = images.index_select(0, index)
        if runtime is None:
            feats = backbone.encode_image(chunk, tokens, bias, placement)  # type: ignore[arg-type]
        else:
            feats = runtime.encode(chunk, tokens, bias, placement)  # type: ignore[arg-type]
        feats = F.normalize(feats.float(), dim=-1)
        if out is None:
            out = feats.new_empty(images.shape[0], feats.shape[1])
        out[index.to(out.device)] = feats
    assert out is not None
    return out


@torch.no_grad()
def classify(backbone: ClipBackbone, images: Tensor, plans: Sequence[Plan]) -> list[Tensor]:
    """Logits per sample (`[C_i]`): encoder passes per signature, then one product per plan."""
    feats = encode(backbone, images, plans)
    logits: list[Tensor | None] = [None] * len(plans)
    for idx in group(plans, id).values():
        plan = plans[idx[0]]
        rows = plan.logits(feats[idx])
        for j, i in enumerate(idx):
            logits[i] = rows[j]
    return [t for t in logits if t is not None]
