"""Train a prompt method's parameters: only they receive gradients; the backbone stays frozen.

The loop knows no method: it asks the method for its parameters (`init`), its loss on one batch
(`objective`) and its default recipe, and runs the recipe's optimizer, schedule, mixed precision
and snapshot averaging. What a batch is (labeled images, conversations) is between the run's data
and the method's objective. The CLIP methods' objectives compute the serving forward with
gradients, so what trains is what serves; the backbone's fingerprint is unchanged after training
(a test checks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from service.backbones.base import Backbone
from service.prompts import get_method
from service.prompts.recipe import Recipe

Batches = Callable[[int], Iterable[Any]]  # epoch -> batches ((images, labels), conversations...)
Progress = Callable[[dict[str, Any]], None]


class Cancelled(Exception):
    """Training was asked to stop; nothing is published."""


@dataclass
class TrainResult:
    method: str
    config: dict[str, Any]
    recipe: Recipe
    params: dict[str, Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def tensor_batches(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    seed: int = 0,
    augment: Callable[[Tensor], Tensor] | None = None,
) -> Batches:
    """Shuffled mini-batches of in-memory tensors, reshuffled per epoch from the seed."""

    def batches(epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = images[idx]
            yield (augment(x) if augment is not None else x), labels[idx]

    return batches


def mixed_precision(recipe: Recipe, device: torch.device) -> bool:
    """bf16 autocast: "auto" turns it on on a GPU only (it is slower on the CPU)."""
    if recipe.mixed_precision == "auto":
        return device.type == "cuda"
    return recipe.mixed_precision == "bf16"


class _Reporter:
    """Progress rows: after every epoch, and within one at most every `every_s` seconds, with the
    step count and an ETA (known once the first epoch has shown how many steps an epoch has)."""

    def __init__(self, progress: Progress | None, epochs: int, every_s: float = 1.0) -> None:
        self.progress, self.epochs, self.every_s = progress, epochs, every_s
        self.start = self.last = time.perf_counter()
        self.steps = 0
        self.per_epoch: int | None = None

    def _row(self, epoch: int, loss: float, acc: float) -> dict[str, Any]:
        total = self.per_epoch * self.epochs if self.per_epoch else None
        eta = None
        if total:
            eta = (time.perf_counter() - self.start) / self.steps * (total - self.steps)
        return {
            "epoch": epoch + 1, "epochs": self.epochs, "step": self.steps, "steps": total,
            "loss": loss, "acc": acc, "eta_s": None if eta is None else round(eta, 1),
        }  # fmt: skip

    def step(self, epoch: int, loss: float, acc: float) -> None:
        self.steps += 1
        now = time.perf_counter()
        if self.progress is not None and now - self.last >= self.every_s:
            self.last = now
            self.progress({**self._row(epoch, loss, acc), "epoch_end": False})

    def epoch_end(self, row: dict[str, Any]) -> None:
        if self.per_epoch is None:
            self.per_epoch = self.steps
        self.last = time.perf_counter()
        if self.progress is not None:
            self.progress({**row, **self._row(row["epoch"] - 1, row["loss"], row["acc"]),
                           "epoch_end": True})  # fmt: skip


def train(
    method_name: str,
    backbone: Backbone,
    batches: Batches,
    classnames: Sequence[str],
    *,
    method_config: dict[str, Any] | None = None,
    templates: Sequence[str] = (),
    recipe: Recipe | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `method_name`'s parameters on `batches`; returns them detached, on the CPU."""
    method = get_method(method_name)
    if method.recipe is None:
        raise ValueError(f"{method_name} has nothing to train")
    recipe = recipe or method.recipe
    cfg = method.config(method_config)
    start = time.perf_counter()
    init = method.init(backbone, cfg, classnames, seed)
    params = {k: v.to(backbone.device).clone().requires_grad_(True) for k, v in init.items()}
    if recipe.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params.values(),
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(params.values(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    objective = method.objective(backbone, cfg, classnames, templates, recipe, seed)
    gpa = recipe.snapshot_weights()
    averaged = {k: torch.zeros_like(v) for k, v in params.items()} if gpa else None
    amp = mixed_precision(recipe, backbone.device)
    history: list[dict[str, float]] = []
    report = _Reporter(progress, recipe.epochs)
    for epoch in range(recipe.epochs):
        for group in opt.param_groups:
            group["lr"] = recipe.epoch_lr(epoch)
        total = correct = seen = 0.0
        for batch in batches(epoch):
            if should_stop is not None and should_stop():
                raise Cancelled("training cancelled")
            # bf16 autocast: activations in half precision, parameters and their grads in fp32
            with torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=amp):
                step = objective.step(params, batch)
            opt.zero_grad(set_to_none=True)
            step.loss.float().backward()
            opt.step()
            total += float(step.loss.detach()) * step.count
            correct += step.correct
            seen += step.count
            report.step(epoch, total / seen, correct / seen)
        if averaged is not None and gpa is not None:
            with torch.no_grad():
                for k, v in params.items():
                    averaged[k] += gpa[epoch] * v
        row = {
            "epoch": epoch + 1,
            "loss": total / max(seen, 1),
            "acc": correct / max(seen, 1),
            "lr": opt.param_groups[0]["lr"],
        }
        history.append(row)
        report.epoch_end(row)
    final = averaged if averaged is not None else params
    return TrainResult(
        method=method_name,
        config=cfg.model_dump(),
        recipe=recipe,
        params={k: v.detach().float().cpu() for k, v in final.items()},
        history=history,
        seconds=time.perf_counter() - start,
    )
