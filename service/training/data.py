"""Training data: labeled image sets from a folder, a CoOp split file, or an upload.

A `LabeledSet` is a list of samples (a file path or in-memory bytes, with a label) and the class
names indexed by label. Few-shot sampling and the base-to-novel protocol are methods/functions on
it; `TorchDataset` and `loader` turn it into batches through the bounded decoder of
`service.images`, so training reads images exactly as serving does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from open_clip.model import get_model_preprocess_cfg
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from service.backbones.clip import ClipBackbone
from service.errors import (
    BadRequest,
    ImageTooLarge,
    InvalidContent,
    NotFound,
    PromptServeError,
    TooLarge,
    TooManyImages,
)
from service.images import ImageLimits, open_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SPLITS = ("train", "val", "test")
MAX_CLASSNAME = 200  # characters: class names become prompt text, which CLIP truncates anyway

Transform = Callable[[Image.Image], torch.Tensor]


class InvalidDataset(InvalidContent):
    """A dataset directory or split file that cannot be used as it is."""

    code = "invalid_dataset"


class TooManyClasses(TooLarge):
    code = "too_many_classes"


@dataclass(frozen=True)
class Sample:
    """One labeled image: a file (`path`) or in-memory encoded bytes (`data`), never both."""

    path: Path | None
    data: bytes | None
    label: int
    classname: str

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("a Sample has exactly one of path and data")

    def read(self, limits: ImageLimits) -> bytes:
        """The encoded bytes, refusing an oversize file before reading it."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        try:
            size = self.path.stat().st_size
            data = None if size > limits.max_bytes else self.path.read_bytes()
        except OSError as err:
            raise InvalidDataset(f"cannot read image {self.path}: {err.strerror or err}") from None
        if data is None:  # never read a huge file just to reject it
            raise ImageTooLarge(
                f"image {self.path} is {size} bytes, over the limit of {limits.max_bytes}"
            )
        return data


@dataclass
class LabeledSet:
    """Samples and the class names indexed by label; `meta` records where they came from."""

    samples: list[Sample]
    classnames: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def subset_classes(self, label_ids: Iterable[int], relabel: bool = True) -> LabeledSet:
        """Only the samples of `label_ids`; relabeled 0..k-1 in order of the original labels."""
        keep = sorted(set(label_ids))
        unknown = [y for y in keep if not 0 <= y < len(self.classnames)]
        if unknown:
            raise ValueError(f"labels {unknown} are not in 0..{len(self.classnames) - 1}")
        new = {old: (i if relabel else old) for i, old in enumerate(keep)}
        samples = [replace(s, label=new[s.label]) for s in self.samples if s.label in new]
        names = [self.classnames[y] for y in keep] if relabel else list(self.classnames)
        return LabeledSet(samples, names, {**self.meta, "classes": keep})

    def few_shot(self, k: int, seed: int) -> LabeledSet:
        """K samples per class, seeded; classes with fewer than K keep all of theirs (Dassl).

        Classes are visited in label order with one `random.Random(seed)`, so the picks of the
        first classes do not depend on later ones: K-shot then base equals base then K-shot.
        """
        if k < 1:
            raise BadRequest(f"shots must be at least 1, not {k}")
        rng = random.Random(seed)
        by_class: dict[int, list[int]] = {}
        for i, s in enumerate(self.samples):
            by_class.setdefault(s.label, []).append(i)
        picked: list[int] = []
        for y in sorted(by_class):
            idx = by_class[y]
            picked.extend(sorted(rng.sample(idx, k)) if len(idx) > k else idx)
        samples = [self.samples[i] for i in picked]
        return LabeledSet(samples, list(self.classnames), {**self.meta, "shots": k, "seed": seed})

    def identity(self) -> dict[str, Any]:
        """What this data is, for checkpoint manifests: provenance plus a content hash.

        The hash covers (path relative to the root, or sha256 of the bytes, label) of every
        sample, sorted, and the class names. File contents are not read: hashing every image of
        a large benchmark for a manifest entry would cost a full pass over the dataset.
        """
        root = self.meta.get("root")
        keys = sorted((_sample_key(s, root), s.label) for s in self.samples)
        digest = hashlib.sha256(json.dumps(self.classnames).encode())
        for key, label in keys:
            digest.update(f"\n{key}\t{label}".encode())
        out = {k: self.meta.get(k) for k in ("source", "root", "split", "shots", "seed")}
        return {
            **self.meta,
            **out,
            "num_classes": len(self.classnames),
            "num_samples": len(self.samples),
            "sha256": digest.hexdigest(),
        }


def _sample_key(sample: Sample, root: str | None) -> str:
    if sample.data is not None:
        return "sha256:" + hashlib.sha256(sample.data).hexdigest()
    assert sample.path is not None
    # Relative to the root, so the same dataset moved to another disk keeps its identity.
    if root is not None and sample.path.is_relative_to(root):
        return sample.path.relative_to(root).as_posix()
    return sample.path.as_posix()


# --- sources ---------------------------------------------------------------------------------


def image_folder(root: Path) -> LabeledSet:
    """One subfolder per class (sorted by name; "_" reads as a space), images anywhere below."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise NotFound(f"dataset folder {root} does not exist")
    # Hidden folders (.ipynb_checkpoints, .git) are tooling debris, not classes.
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise InvalidDataset(f"{root} has no class subfolders (expected ROOT/<class>/<image>)")
    samples: list[Sample] = []
    classnames = [d.name.replace("_", " ") for d in dirs]
    for label, d in enumerate(dirs):
        files = sorted(
            p
            for p in d.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise InvalidDataset(
                f"class folder {d} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                "remove it or add images"
            )
        samples.extend(Sample(p, None, label, classnames[label]) for p in files)
    return LabeledSet(samples, classnames, {"source": "image_folder", "root": str(root)})


def coop_split(root: Path, split_file: Path, split: Literal["train", "val", "test"]) -> LabeledSet:
    """One split of a CoOp `split_zhou_<Dataset>.json` over its image root.

    Class names come from all three splits together, so train, val and test share one label
    space; labels must be 0..C-1, each with one name, and every path must stay inside `root`.
    """
    if split not in SPLITS:
        raise BadRequest(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    root, split_file = Path(root).absolute(), Path(split_file)
    if not root.is_dir():
        raise NotFound(f"dataset image root {root} does not exist")
    try:
        table = json.loads(split_file.read_text())
    except FileNotFoundError:
        raise NotFound(f"split file {split_file} does not exist") from None
    except (OSError, ValueError) as err:
        raise InvalidDataset(f"split file {split_file} is not readable JSON: {err}") from None
    if not isinstance(table, dict) or not all(isinstance(table.get(s), list) for s in SPLITS):
        raise InvalidDataset(f"split file {split_file} needs lists 'train', 'val' and 'test'")

    names: dict[int, str] = {}
    entries: dict[str, list[tuple[str, int, str]]] = {}
    for part in SPLITS:
        entries[part] = []
        for i, item in enumerate(table[part]):
            where = f"{split_file.name} {part}[{i}]"
            entries[part].append(_check_entry(item, where))
            _, label, name = entries[part][-1]
            if names.setdefault(label, name) != name:
                raise InvalidDataset(
                    f"{where}: label {label} is named both {names[label]!r} and {name!r}"
                )
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
        raise InvalidDataset(f"{split_file.name}: labels must be 0..C-1; missing {missing[:10]}")
    classnames = [names[y] for y in range(len(names))]
    samples = [
        Sample(_inside(root, rel, f"{split_file.name} {split}"), None, label, name)
        for rel, label, name in entries[split]
    ]
    dataset = split_file.stem.removeprefix("split_zhou_")
    meta = {"source": "coop_split", "dataset": dataset, "root": str(root), "split": split}
    return LabeledSet(samples, classnames, meta)


def _check_entry(item: Any, where: str) -> tuple[str, int, str]:
    ok = (
        isinstance(item, list)
        and len(item) == 3
        and isinstance(item[0], str)
        and type(item[1]) is int  # bool is an int subclass; True is not a label
        and item[1] >= 0
        and isinstance(item[2], str)
        and item[2].strip() != ""
    )
    if not ok:
        raise InvalidDataset(f"{where} must be [image path, label >= 0, class name], got {item!r}")
    return item[0], item[1], item[2]


def _inside(root: Path, rel: str, where: str) -> Path:
    # A lexical check: a split file must not name files outside its root ("../", "/etc/...").
    # Symlinks inside the root are not resolved, because dataset trees are often symlink farms.
    path = Path(os.path.normpath(root / rel))
    if not path.is_relative_to(root) or path == root:
        raise InvalidDataset(f"{where}: image path {rel!r} leaves the dataset root {root}")
    return path


def uploaded_set(
    items: list[tuple[bytes, str]],
    limits: ImageLimits,
    max_items: int = 2000,
    max_classes: int = 1000,
    min_classes: int = 2,
) -> LabeledSet:
    """A bounded few-shot set sent through the API: (image bytes, class name) pairs.

    Every image is decoded once here, so a bad one is refused before a job is queued; labels are
    the indices of the sorted class names.
    """
    if len(items) > max_items:
        raise TooManyImages(f"{len(items)} images sent; a training set may have {max_items}")
    names = sorted({name.strip() for _, name in items})
    if len(names) > max_classes:
        raise TooManyClasses(f"{len(names)} classes sent; a training set may have {max_classes}")
    if len(names) < min_classes:
        raise BadRequest(f"a set needs images of at least {min_classes} classes")
    for name in names:
        if not name or len(name) > MAX_CLASSNAME:
            raise BadRequest(f"class names must be 1..{MAX_CLASSNAME} characters, got {name!r}")
    label_of = {name: i for i, name in enumerate(names)}
    samples = []
    for i, (data, name) in enumerate(items):
        try:
            open_image(data, limits)
        except PromptServeError as err:  # same type and status, plus which item it was
            raise type(err)(f"image {i} (class {name.strip()!r}): {err.message}") from None
        samples.append(Sample(None, data, label_of[name.strip()], name.strip()))
    return LabeledSet(samples, names, {"source": "upload"})


def base_novel(ds: LabeledSet) -> tuple[LabeledSet, LabeledSet]:
    """CoOp's base-to-novel split: the first ceil(C/2) labels are base, the rest novel."""
    n = len(ds.classnames)
    m = math.ceil(n / 2)  # as CoOp's subsample_classes
    base = ds.subset_classes(range(m))
    novel = ds.subset_classes(range(m, n))
    base.meta["classes"], novel.meta["classes"] = "base", "novel"
    return base, novel


# --- transforms and loading ------------------------------------------------------------------


def train_transform(backbone: ClipBackbone) -> Transform:
    """The reference training transform (Dassl as configured by CoOp) at the backbone's size.

    random_resized_crop (scale 0.08..1, bicubic), random_flip, normalize with the backbone's mean
    and std. open_clip's own train transform has no flip, so it is built here.
    """
    cfg = get_model_preprocess_cfg(backbone.model)
    return T.Compose(
        [
            T.RandomResizedCrop(
                cfg["size"], scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=cfg["mean"], std=cfg["std"]),
        ]
    )


def eval_transform(backbone: ClipBackbone) -> Transform:
    """The backbone's own preprocessing: the transform serving uses."""
    return backbone.preprocess


class TorchDataset(Dataset[tuple[torch.Tensor, int]]):
    """A LabeledSet as a torch Dataset of (transformed image, label)."""

    def __init__(
        self, ds: LabeledSet, transform: Transform, limits: ImageLimits | None = None
    ) -> None:
        self.ds, self.transform = ds, transform
        self.limits = limits or ImageLimits()

    def __len__(self) -> int:
        return len(self.ds.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.ds.samples[index]
        image = open_image(sample.read(self.limits), self.limits)
        return self.transform(image), sample.label


def loader(
    ds: LabeledSet,
    transform: Transform,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """Batches `(images [B, 3, H, W], labels [B])`; the order is seeded by `seed`.

    Augmentations draw from torch's RNG: in-process (num_workers=0) the global one, which the
    caller seeds; in workers, per-worker seeds that DataLoader derives from this generator.
    """
    return DataLoader(
        TorchDataset(ds, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
