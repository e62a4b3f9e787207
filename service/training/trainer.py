"""Train a prompt method on labeled images: only prompt parameters receive gradients.

The backbone stays frozen (its fingerprint is unchanged after training; a test checks it). The
forward is the serving forward (`backbone.encode_image` under the method's vision prompts, class
embeddings from its text side) with gradients, so what trains is what serves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.backbones.clip import ClipBackbone
from service.prompts import get_method
from service.prompts.base import DEFAULT_TEMPLATES, PromptMethod
from service.prompts.cocoop import conditional_classes
from service.prompts.dualview import hand_view, soft_view
from service.prompts.zeroshot import TEMPLATE_SETS
from service.training import losses
from service.training.recipes import RECIPES, Recipe

Batches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]  # epoch -> (images, labels) batches
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


def epoch_lr(recipe: Recipe, epoch: int) -> float:
    """Dassl's schedule: constant warm-up, then cosine over the whole run (per epoch)."""
    if epoch < recipe.warmup_epochs:
        return recipe.warmup_lr
    t = epoch - recipe.warmup_epochs
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * t / max(1, recipe.epochs)))


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


class _Objective:
    """Logits and loss of one method on one batch; caches what does not depend on the params."""

    def __init__(
        self,
        method: PromptMethod,
        backbone: ClipBackbone,
        cfg: Any,
        classnames: Sequence[str],
        templates: Sequence[str],
        recipe: Recipe,
        seed: int,
    ) -> None:
        self.m, self.bb, self.cfg, self.recipe = method, backbone, cfg, recipe
        self.classnames, self.templates = list(classnames), tuple(templates) or DEFAULT_TEMPLATES
        self.scale = backbone.logit_scale
        self.gen = torch.Generator().manual_seed(seed)
        self._fixed_classes: Tensor | None = None
        self._frozen_text: Tensor | None = None
        self._hand: Tensor | None = None
        self._cocoop_text: Any = None  # CoCoOp's frozen prompt embeddings: built once, not per step

    def classes(self, params: dict[str, Tensor]) -> Tensor:
        if self._fixed_classes is not None:
            return self._fixed_classes
        out = self.m.class_embeddings(params, self.bb, self.cfg, self.classnames, self.templates)
        if not out.requires_grad:  # a frozen text side (VPT, vision-only bias): compute once
            self._fixed_classes = out.detach()
        return out

    def frozen_text(self) -> Tensor:
        if self._frozen_text is None:
            with torch.no_grad():
                templates = (
                    self.templates if len(self.templates) > 1 else TEMPLATE_SETS["imagenet80"]
                )
                self._frozen_text = hand_view(self.bb, self.classnames, templates)
        return self._frozen_text

    def loss(
        self, params: dict[str, Tensor], images: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        tokens, bias = self.m.vision_prompts(params, self.bb, self.cfg)
        feats = F.normalize(
            self.bb.encode_image(images, tokens, bias, self.m.placement).float(), dim=-1
        )
        name = self.m.name
        if name == "cocoop":
            if self._cocoop_text is None:
                self._cocoop_text = self.m.text(  # type: ignore[attr-defined]
                    self.bb, self.cfg, self.classnames
                )
            per_image = conditional_classes(self.bb, params, self._cocoop_text, feats)
            logits = self.scale * torch.einsum("be,bce->bc", feats, per_image)
            return F.cross_entropy(logits, labels), logits
        if name == "dualview":
            soft = soft_view(params, self.bb, self.cfg, self.classnames)
            if self._hand is None:
                with torch.no_grad():
                    self._hand = hand_view(self.bb, self.classnames, self.templates)
            w = float(self.cfg.view_weight)
            classes = F.normalize(w * soft + (1 - w) * self._hand, dim=-1)
            logits = self.scale * feats @ classes.t()
            mixed = losses.classwise_mix(feats.detach(), labels, self.gen)
            loss = (
                F.cross_entropy(logits, labels)
                + self.recipe.mi_weight * losses.view_mutual_information(soft, self._hand)
                + self.recipe.augment_weight
                * F.cross_entropy(self.scale * mixed @ classes.t(), labels)
            )
            return loss, logits
        classes = self.classes(params)
        logits = self.scale * feats @ classes.t()
        loss = F.cross_entropy(logits, labels)
        if name == "promptsrc":
            with torch.no_grad():
                frozen_img = F.normalize(self.bb.encode_image(images).float(), dim=-1)
                frozen_logits = self.scale * frozen_img @ self.frozen_text().t()
            loss = loss + losses.promptsrc_regularizers(
                classes,
                self.frozen_text(),
                feats,
                frozen_img,
                logits,
                frozen_logits,
                self.recipe.text_loss_weight,
                self.recipe.image_loss_weight,
            )
        return loss, logits


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
    backbone: ClipBackbone,
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
    if method_name not in RECIPES:
        raise ValueError(f"{method_name} has nothing to train")
    recipe = recipe or RECIPES[method_name]
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
    objective = _Objective(method, backbone, cfg, classnames, templates, recipe, seed)
    gpa = (
        losses.gaussian_weights(recipe.epochs, recipe.gpa_mean, recipe.gpa_std)
        if recipe.gpa_std > 0
        else None
    )
    averaged = {k: torch.zeros_like(v) for k, v in params.items()} if gpa else None
    amp = mixed_precision(recipe, backbone.device)
    history: list[dict[str, float]] = []
    report = _Reporter(progress, recipe.epochs)
    for epoch in range(recipe.epochs):
        for group in opt.param_groups:
            group["lr"] = epoch_lr(recipe, epoch)
        total = correct = seen = 0.0
        for images, labels in batches(epoch):
            if should_stop is not None and should_stop():
                raise Cancelled("training cancelled")
            images, labels = images.to(backbone.device), labels.to(backbone.device)
            # bf16 autocast: activations in half precision, parameters and their grads in fp32
            with torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=amp):
                loss, logits = objective.loss(params, images, labels)
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            opt.step()
            total += float(loss.detach()) * len(labels)
            correct += float((logits.argmax(-1) == labels).sum())
            seen += len(labels)
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
