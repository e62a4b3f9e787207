"""Resolve a run's dataset spec into training batches and evaluation sets (`RunData`).

Which dataset kinds a method can train on follows from what its plans serve (`Method.task`):
labeled images for classification, conversations for instruction answering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service import errors
from service.backbones.clip import ClipBackbone
from service.images import ImageLimits, decode_base64
from service.prompts.method import Method
from service.training import data
from service.training.runs import EvalSet, RunData, TrainSpec, UploadedImage

EVAL_BATCH = 64
KINDS: dict[str, tuple[str, ...]] = {  # what a method's task trains on (DatasetSpec.kind)
    "classify": ("image_folder", "coop_split", "proving_ground", "upload"),
    "answer": ("llava_json",),
}


def check_kind(method: Method[Any, Any, Any], spec: TrainSpec) -> None:
    """Refuse a dataset the method's objective cannot learn from (before anything is read)."""
    kinds = KINDS.get(method.task, ())
    if spec.dataset.kind not in kinds:
        raise errors.InvalidContent(
            f"{method.name} trains on dataset kind {' or '.join(map(repr, kinds))}, not "
            f"{spec.dataset.kind!r}"
        )
    if spec.dataset.kind == "llava_json" and not spec.dataset.split_file:
        raise errors.InvalidContent("dataset kind 'llava_json' needs split_file = the JSON file")


def _batches(ds: data.LabeledSet, transform: data.Transform, size: int, shuffle: bool, seed: int):
    def gen() -> Iterable[tuple[Tensor, Tensor]]:
        for images, labels in data.loader(ds, transform, size, shuffle=shuffle, seed=seed):
            yield images, torch.as_tensor(labels)

    return gen


def load_data(spec: TrainSpec, backbone: Any, batch_size: int) -> RunData:
    """Training batches (K-shot, augmented like the reference) and test sets for a spec."""
    ds = spec.dataset
    if ds.kind == "llava_json":
        from service.training import conversations

        return conversations.load_data(spec, backbone, batch_size)
    if ds.kind == "proving_ground":
        return _proving_ground(spec, backbone, batch_size)
    if ds.kind == "upload":
        train, test = uploaded(spec)
    elif ds.root is None:
        raise errors.BadRequest(f"dataset kind {ds.kind} needs a root directory")
    elif ds.kind == "image_folder":
        train = test = data.image_folder(Path(ds.root))  # one folder: evaluated on all of it
    else:
        root = Path(ds.root)
        if ds.split_file is None:
            raise errors.BadRequest("coop_split needs split_file (split_zhou_<Dataset>.json)")
        train = data.coop_split(root, Path(ds.split_file), "train")
        test = data.coop_split(root, Path(ds.split_file), "test")
    evals: dict[str, data.LabeledSet]
    if spec.base_to_novel:
        train, _ = data.base_novel(train)
        base, novel = data.base_novel(test)
        evals = {"base": base, "novel": novel}
    else:  # an upload without held-out images is scored on what it trained on, named so
        held_out = ds.kind != "upload" or bool(ds.test_images)
        evals = {"test" if held_out else "train": test}
    if spec.shots is not None:
        train = train.few_shot(spec.shots, spec.seed)
    augment, plain = data.train_transform(backbone), data.eval_transform(backbone)

    def train_batches(epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        return _batches(train, augment, batch_size, True, spec.seed * 1000 + epoch)()

    return RunData(
        classnames=list(train.classnames),
        train=train_batches,
        evals={
            k: EvalSet(list(v.classnames), _batches(v, plain, EVAL_BATCH, False, 0))
            for k, v in evals.items()
        },
        identity=train.identity(),
    )


def uploaded(spec: TrainSpec) -> tuple[data.LabeledSet, data.LabeledSet]:
    """The training and test sets of an `upload` dataset, every image decoded and checked (so a
    bad one is refused at submit time). Without `test_images` the test set is the training set:
    the run's accuracy then says how well the prompts fit the uploaded images, nothing more."""
    ds = spec.dataset
    if not ds.images:
        raise errors.BadRequest("an upload dataset needs images: [{image: <base64>, label}]")
    limits = ImageLimits()

    def items(images: list[UploadedImage], what: str) -> list[tuple[bytes, str]]:
        out = []
        for i, item in enumerate(images):
            try:
                out.append((decode_base64(item.image, limits), item.label))
            except errors.PromptServeError as err:
                raise type(err)(f"{what} {i}: {err.message}") from None
        return out

    train = data.uploaded_set(items(ds.images, "image"), limits)
    if not ds.test_images:
        return train, train
    test = data.uploaded_set(items(ds.test_images, "test image"), limits, min_classes=1)
    index = {name: i for i, name in enumerate(train.classnames)}
    unknown = sorted(set(test.classnames) - set(index))
    if unknown:
        raise errors.BadRequest(f"test images name classes with no training images: {unknown}")
    samples = [replace(s, label=index[s.classname]) for s in test.samples]
    return train, data.LabeledSet(samples, list(train.classnames), test.meta)


def _proving_ground(spec: TrainSpec, backbone: ClipBackbone, batch_size: int) -> RunData:
    """A shifted domain of the offline proving ground (generated images, in memory)."""
    from service.training import proving_ground as pg
    from service.training.trainer import tensor_batches

    domain = spec.dataset.domain or pg.TARGETS[0]
    if domain not in pg.DOMAINS:
        raise errors.BadRequest(f"unknown proving-ground domain {domain!r}: {sorted(pg.DOMAINS)}")
    train = pg.make_dataset(domain, "train", per_class=max(spec.shots or 16, 16), seed=spec.seed)
    test = pg.make_dataset(domain, "test", per_class=50, seed=0)
    if spec.base_to_novel:
        train = train.subset(train.base_classes())
        evals = {
            "base": test.subset(test.base_classes()),
            "novel": test.subset(test.novel_classes()),
        }
    else:
        evals = {"test": test}
    if spec.shots is not None:
        train = train.few_shot(spec.shots, spec.seed)
    images = pg.to_model_input(train.images, backbone)

    gen = torch.Generator().manual_seed(spec.seed)

    def flip(x: Tensor) -> Tensor:  # the reference's random flip; shapes stay their class
        mask = torch.rand(len(x), generator=gen) < 0.5
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)

    def eval_batches(d: pg.Dataset) -> Callable[[], Iterable[tuple[Tensor, Tensor]]]:
        x = pg.to_model_input(d.images, backbone)
        return lambda: ((x[i : i + 256], d.labels[i : i + 256]) for i in range(0, len(d), 256))

    return RunData(
        classnames=list(train.classnames),
        train=tensor_batches(images, train.labels, batch_size, spec.seed, augment=flip),
        evals={k: EvalSet(list(v.classnames), eval_batches(v)) for k, v in evals.items()},
        identity={
            "source": "proving_ground",
            "domain": domain,
            "shots": spec.shots,
            "seed": spec.seed,
            "num_classes": len(train.classnames),
            "world_version": pg.WORLD_VERSION,
        },
    )
