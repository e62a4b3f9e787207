"""A training run end to end: data -> train -> evaluate -> one validated checkpoint in the store.

The same function runs in the foreground (`promptserve train`) and in the worker (`promptserve
worker`, jobs submitted through the API). A run publishes nothing unless it finished: a failure
or a cancel leaves the store as it was.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

import prompts_store as ps
from service.backbones.base import Backbone
from service.checkpoints import NAME_PATTERN, check_backbone, dump, new_manifest
from service.checkpoints.publish import Published, publish
from service.checkpoints.store_errors import store_errors
from service.errors import InvalidContent
from service.prompts import get_method
from service.training.curves import save_curves
from service.training.evaluate import harmonic_mean
from service.training.trainer import Batches, Progress, TrainResult, train

log = logging.getLogger(__name__)


class UploadedImage(BaseModel):
    """One labeled image of a few-shot set sent with the job (base64 of the encoded file)."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(max_length=16 * 2**20)
    label: str = Field(min_length=1, max_length=200)


MAX_UPLOADED = 2000  # images per uploaded set: a few-shot set, not a dataset to host


class DatasetSpec(BaseModel):
    """Where the images come from. `upload`: the images travel inside the job itself (bounded by
    the request body limit), so a worker on any machine can train on them."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["image_folder", "coop_split", "proving_ground", "upload", "llava_json"]
    root: str | None = None
    split_file: str | None = None
    domain: str | None = Field(default=None, description="proving-ground domain")
    images: list[UploadedImage] | None = Field(
        default=None, max_length=MAX_UPLOADED, description="upload: the training images"
    )
    test_images: list[UploadedImage] | None = Field(
        default=None, max_length=MAX_UPLOADED, description="upload: held-out images (optional)"
    )


class TrainSpec(BaseModel):
    """Everything a run needs; what the jobs API accepts."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN.pattern)
    method: str
    dataset: DatasetSpec
    method_config: dict[str, Any] = Field(default_factory=dict)
    recipe: dict[str, Any] = Field(default_factory=dict, description="overrides of the recipe")
    templates: list[str] = Field(default_factory=list, max_length=100)
    shots: int | None = Field(default=16, ge=1, le=10_000)
    seed: int = Field(default=0, ge=0)
    base_to_novel: bool = False
    activate: bool = True


@dataclass
class EvalSet:
    """Evaluation data, batched as the method's objective takes it (labeled images for the
    classification methods)."""

    classnames: list[str]
    batches: Callable[[], Iterable[Any]]


Scorer = Callable[[Any, TrainSpec, dict[str, Tensor], dict[str, EvalSet]], dict[str, Any]]


@torch.no_grad()
def evaluate_sets(
    backbone: Any, spec: TrainSpec, params: dict[str, Tensor], evals: dict[str, EvalSet]
) -> dict[str, Any]:
    """Accuracy per evaluation set of labeled images (params materialized with that set's class
    names, classified through the serving forward)."""
    from service.engine.forward import classify

    method = get_method(spec.method)
    cfg = method.config(spec.method_config)
    metrics: dict[str, Any] = {}
    for name, ev in evals.items():
        try:
            plan = method.materialize(params, backbone, cfg, ev.classnames, spec.templates)
        except Exception as exc:  # e.g. class-specific context cannot name novel classes
            metrics[name] = {"skipped": str(exc)[:200]}
            continue
        hits = total = 0
        per_class = torch.zeros(len(ev.classnames))
        counts = torch.zeros(len(ev.classnames))
        for images, labels in ev.batches():
            logits = torch.stack(classify(backbone, images, [plan] * len(images)))
            ok = (logits.argmax(-1).cpu() == labels).float()
            hits += int(ok.sum())
            total += len(labels)
            per_class.index_add_(0, labels, ok)
            counts.index_add_(0, labels, torch.ones_like(ok))
        metrics[name] = {
            "accuracy": hits / max(total, 1),
            "n": total,
            "per_class": {
                c: float(per_class[i] / counts[i]) if counts[i] else None
                for i, c in enumerate(ev.classnames)
            },
        }
    base, novel = metrics.get("base", {}), metrics.get("novel", {})
    if "accuracy" in base and "accuracy" in novel:
        metrics["hm"] = harmonic_mean(base["accuracy"], novel["accuracy"])
    return metrics


@dataclass
class RunData:
    """A dataset resolved for one run: training batches, evaluation sets, identity, and how the
    trained parameters are scored on the evaluation sets (accuracy, unless the data says)."""

    classnames: list[str]
    train: Batches
    evals: dict[str, EvalSet]
    identity: dict[str, Any]
    score: Scorer = evaluate_sets


@dataclass
class RunResult:
    published: Published
    metrics: dict[str, Any]
    result: TrainResult
    curves: Path | None


DataLoaderFn = Callable[[TrainSpec, Any, int], RunData]


def run(
    spec: TrainSpec,
    backbone: Backbone,
    store: ps.PromptStore,
    load_data: DataLoaderFn,
    *,
    out_dir: Path | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Train, evaluate and publish one checkpoint; raises (publishing nothing) on failure."""
    method = get_method(spec.method)
    check_backbone(method, backbone)
    if method.recipe is None:
        raise InvalidContent(f"method {spec.method!r} has nothing to train")
    recipe = method.recipe.with_overrides(spec.recipe)
    data = load_data(spec, backbone, recipe.batch_size)
    result = train(
        spec.method,
        backbone,
        data.train,
        data.classnames,
        method_config=spec.method_config,
        templates=spec.templates,
        recipe=recipe,
        seed=spec.seed,
        progress=progress,
        should_stop=should_stop,
    )
    metrics = data.score(backbone, spec, result.params, data.evals)
    metrics["train_seconds"] = round(result.seconds, 2)
    metrics["final_train_loss"] = result.history[-1]["loss"] if result.history else None
    with store_errors():
        try:
            parent = store.current(spec.name)
        except ps.NotFound:
            parent = None
    manifest = new_manifest(
        spec.name,
        spec.method,
        backbone,
        data.classnames,
        result.config,
        spec.templates,
        metrics=summary(metrics),
        dataset=data.identity,
        parent=parent,
    )
    published = publish(store, backbone, dump(result.params, manifest), activate=spec.activate)
    curves = None
    if out_dir is not None:
        run_dir = out_dir / f"{published.name}-v{published.version}"
        curves = save_curves(
            result.history, run_dir / "curves.png", f"{spec.method} on {spec.name}"
        )
        (run_dir / "run.json").write_text(
            json.dumps(
                {"spec": spec.model_dump(), "history": result.history, "metrics": metrics},
                indent=1,
                default=str,
            )
        )
    log.info(
        "published %s v%s (%s): %s",
        published.name,
        published.version,
        spec.method,
        summary(metrics),
    )
    return RunResult(published, metrics, result, curves)


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest's metrics: accuracies and the harmonic mean, without per-class tables."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and "accuracy" in value:
            out[f"{key}_accuracy"] = round(value["accuracy"], 4)
        elif not isinstance(value, dict):
            out[key] = value
    return out
