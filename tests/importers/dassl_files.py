"""Reference-layout Dassl checkpoints, built in-test (nothing from the reference repositories).

What a `model.pth.tar-N` holds, as Dassl's `save_model` writes it (dassl/engine/trainer.py and
dassl/utils/torchtools.py, read to get the layout right): `{"state_dict", "epoch", "optimizer",
"scheduler", "val_result"}`, where "scheduler" is the `state_dict()` of Dassl's constant-warmup
wrapper around `CosineAnnealingLR` (every reference config sets WARMUP_EPOCH 1). torch's
`LRScheduler.state_dict()` keeps every attribute but the optimizer, so the wrapped cosine
scheduler object, and inside it the SGD object with its momentum buffers, are pickled.
The state dict is half precision where the references' `PREC: "fp16"` makes it so: CLIP's
`convert_weights` turns conv, linear and attention weights and the two projections to fp16 and
leaves layer norms, embeddings and `logit_scale` in fp32.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR

FP32_KEYS = ("class_embedding", "positional_embedding", "logit_scale")


class ConstantWarmup(LRScheduler):
    """A stand-in with the state Dassl's ConstantWarmupScheduler has (successor, warmup_epoch,
    cons_lr); its own class is never pickled, only its `state_dict()`."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        self.cons_lr = cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def reference_dtype(name: str, t: Tensor) -> Tensor:
    """A frozen CLIP tensor at the precision a PREC "fp16" reference model holds it."""
    keep = "ln_" in name or name.endswith(FP32_KEYS)
    return t.detach().float().clone() if keep else t.detach().half()


def frozen_clip(backbone, zero_shot_tower: bool = False) -> dict[str, Tensor]:
    """The frozen CLIP a whole-model reference saves, under its names (no token embedding: the
    references' TextEncoder does not hold it)."""
    out = {}
    for key, t in backbone.model.state_dict().items():
        if key == "token_embedding.weight":
            continue
        if key.startswith("visual."):
            ref = "image_encoder." + key.removeprefix("visual.")
            if zero_shot_tower:
                zs = "prompt_learner.ZS_image_encoder." + key.removeprefix("visual.")
                out[zs] = reference_dtype(key, t)
        else:
            ref = key if key == "logit_scale" else "text_encoder." + key
        out[ref] = reference_dtype(key, t)
    return out


def token_buffers(backbone, classnames, n_ctx, phrase="", prefix="") -> dict[str, Tensor]:
    """`token_prefix` / `token_suffix` as every prompt learner registers them (fp16)."""
    text = phrase or " ".join(["X"] * n_ctx)
    ids = backbone.tokenize([f"{text} {c.replace('_', ' ')}." for c in classnames])
    with torch.no_grad():
        emb = backbone.embed_tokens(ids).half()
    return {prefix + "token_prefix": emb[:, :1], prefix + "token_suffix": emb[:, 1 + n_ctx :]}


def gaussian_weights(epochs: int, mean: float, std: float) -> list[float]:
    """PromptSRC's GPA weights: a Gaussian over epochs 1..N, normalized to sum to 1."""
    g = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in
         range(1, epochs + 1)]  # fmt: skip
    total = sum(g)
    return [x / total for x in g]


def aggregate(state: dict[str, Tensor], epochs: int, mean: float, std: float) -> dict[str, Tensor]:
    """PromptSRC's Gaussian prompt aggregation of an (unchanging) state dict, epoch by epoch in
    each tensor's own precision: previous + weight * current, as its trainer accumulates it."""
    acc: dict[str, Tensor] | None = None
    for w in gaussian_weights(epochs, mean, std):
        term = {k: v * w for k, v in state.items()}
        acc = term if acc is None else {k: acc[k] + term[k] for k in state}
    assert acc is not None
    return acc


def save_dassl(
    path: Path,
    state: dict[str, Tensor],
    trainable: list[str],
    epoch: int,
    max_epoch: int | None = None,
    warmup: bool = True,
) -> Path:
    """Write `state` the way Dassl's save_model does, with an SGD (momentum 0.9, as Dassl's
    defaults) over the trainable tensors, stepped once so that its momentum buffers exist."""
    params = [nn.Parameter(state[k].detach().clone()) for k in trainable]
    optim = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    if warmup:
        cosine = CosineAnnealingLR(optim, float(max_epoch or epoch))
        sched: LRScheduler = ConstantWarmup(optim, cosine, 1, 1e-5)
    else:  # Dassl's defaults (no warmup, single_step), e.g. CoOp/rn50_val.yaml
        sched = StepLR(optim, step_size=max_epoch or epoch)
    sum((p.float() ** 2).sum() for p in params).backward()
    optim.step()
    sched.step()
    state_dict = OrderedDict(state)
    state_dict._metadata = OrderedDict({"": {"version": 1}})  # as nn.Module.state_dict() sets
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": state_dict,
            "epoch": epoch,
            "optimizer": optim.state_dict(),
            "scheduler": sched.state_dict(),
            "val_result": None,
        },
        path,
    )
    return path
