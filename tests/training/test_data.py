"""Training data sources, sampling, protocol and transforms; every image is generated here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from service import errors
from service.backbones.clip import ClipBackbone
from service.images import ImageLimits
from service.training import data
from service.training.data import LabeledSet, Sample

LIMITS = ImageLimits()


def png(seed: int, size: tuple[int, int] = (40, 28)) -> bytes:
    """A non-uniform image (so crops and flips change it), distinct per seed."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, "PNG")
    return buf.getvalue()


def write(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(seed))
    return path


def synthetic(per_class: list[int]) -> LabeledSet:
    names = [f"class {i}" for i in range(len(per_class))]
    samples = [
        Sample(Path(f"/d/{y}/{i}.png"), None, y, names[y])
        for y, n in enumerate(per_class)
        for i in range(n)
    ]
    return LabeledSet(samples, names, {"source": "test", "root": "/d"})


# --- sources -------------------------------------------------------------------------------


def test_image_folder_reads_classes_sorted_with_readable_names(tmp_path: Path) -> None:
    for cls, n in (("sea_turtle", 2), ("cat", 3), ("dog", 1)):
        for i in range(n):
            write(tmp_path / cls / f"{i}.png", i)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()

    ds = data.image_folder(tmp_path)

    assert ds.classnames == ["cat", "dog", "sea turtle"]
    assert sorted(ds.labels()) == [0, 0, 0, 1, 2, 2]
    assert all(s.classname == ds.classnames[s.label] for s in ds.samples)
    assert all(s.path is not None and s.path.suffix == ".png" for s in ds.samples)


def test_image_folder_refuses_an_empty_class(tmp_path: Path) -> None:
    write(tmp_path / "cat" / "0.png", 0)
    (tmp_path / "dog").mkdir()
    with pytest.raises(data.InvalidDataset, match="dog"):
        data.image_folder(tmp_path)


def split_table() -> dict[str, list[list[object]]]:
    return {
        "train": [["a/1.png", 0, "apple"], ["b/1.png", 1, "banana"], ["c/1.png", 2, "cherry"]],
        "val": [["a/2.png", 0, "apple"], ["c/2.png", 2, "cherry"]],
        "test": [["a/3.png", 0, "apple"], ["b/3.png", 1, "banana"]],
    }


def write_split(tmp_path: Path, table: object) -> tuple[Path, Path]:
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    split_file = tmp_path / "split_zhou_Fruits.json"
    split_file.write_text(json.dumps(table))
    return root, split_file


def test_coop_split_reads_each_split_with_the_shared_class_names(tmp_path: Path) -> None:
    root, split_file = write_split(tmp_path, split_table())

    train = data.coop_split(root, split_file, "train")
    val = data.coop_split(root, split_file, "val")
    test = data.coop_split(root, split_file, "test")

    # val lacks banana and test lacks cherry, yet all three splits share one label space.
    for ds in (train, val, test):
        assert ds.classnames == ["apple", "banana", "cherry"]
    assert train.labels() == [0, 1, 2] and val.labels() == [0, 2] and test.labels() == [0, 1]
    assert [s.path for s in val.samples] == [root / "a/2.png", root / "c/2.png"]
    assert train.identity()["dataset"] == "Fruits"
    assert train.identity()["split"] == "train"


@pytest.mark.parametrize("bad_path", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "."])
def test_coop_split_refuses_paths_outside_the_root(tmp_path: Path, bad_path: str) -> None:
    table = split_table()
    table["test"].append([bad_path, 1, "banana"])
    root, split_file = write_split(tmp_path, table)
    with pytest.raises(data.InvalidDataset, match="leaves the dataset root") as info:
        data.coop_split(root, split_file, "test")
    assert errors.http_status(info.value) == 422


def test_coop_split_accepts_an_absolute_path_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    table = split_table()
    table["train"][0][0] = str(root / "a" / "1.png")
    root, split_file = write_split(tmp_path, table)
    assert data.coop_split(root, split_file, "train").samples[0].path == root / "a" / "1.png"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t["val"].append(["a/9.png", 0, "pear"]), "named both"),
        (lambda t: t["train"].append(["d/1.png", 4, "date"]), r"missing \[3\]"),
        (lambda t: t["train"].append(["d/1.png", True, "banana"]), "must be"),
        (lambda t: t.pop("val"), "'train', 'val' and 'test'"),
    ],
)
def test_coop_split_refuses_inconsistent_tables(tmp_path: Path, mutate, message: str) -> None:
    table = split_table()
    mutate(table)
    root, split_file = write_split(tmp_path, table)
    with pytest.raises(data.InvalidDataset, match=message):
        data.coop_split(root, split_file, "train")


def test_coop_split_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound):
        data.coop_split(tmp_path, tmp_path / "split_zhou_None.json", "train")


def test_uploaded_set_labels_sorted_class_names() -> None:
    items = [(png(1), "dog"), (png(2), " cat "), (png(3), "dog")]
    ds = data.uploaded_set(items, LIMITS)
    assert ds.classnames == ["cat", "dog"]
    assert ds.labels() == [1, 0, 1]
    assert ds.samples[0].data == items[0][0] and ds.samples[0].path is None


def test_uploaded_set_refuses_a_corrupt_image_up_front() -> None:
    good = png(1)
    broken = good[: len(good) // 2]  # a truncated PNG: its header is fine, its data is not
    with pytest.raises(errors.InvalidImage, match="image 1"):
        data.uploaded_set([(good, "cat"), (broken, "dog")], LIMITS)


def test_uploaded_set_is_bounded() -> None:
    items = [(png(i), f"c{i % 2}") for i in range(4)]
    with pytest.raises(errors.TooManyImages) as info:
        data.uploaded_set(items, LIMITS, max_items=3)
    assert errors.http_status(info.value) == 413
    with pytest.raises(errors.TooLarge, match="classes"):
        data.uploaded_set([(png(i), f"c{i}") for i in range(4)], LIMITS, max_classes=3)
    with pytest.raises(errors.BadRequest, match="2 classes"):
        data.uploaded_set([(png(1), "cat")], LIMITS)


# --- sampling and protocol -----------------------------------------------------------------


def test_few_shot_is_seeded_and_keeps_small_classes_whole() -> None:
    ds = synthetic([10, 10, 2])

    a, b, c = ds.few_shot(4, seed=1), ds.few_shot(4, seed=1), ds.few_shot(4, seed=2)

    assert a.samples == b.samples
    assert a.samples != c.samples
    assert [a.labels().count(y) for y in range(3)] == [4, 4, 2]
    assert set(a.samples) <= set(ds.samples)
    assert a.classnames == ds.classnames
    assert (a.identity()["shots"], a.identity()["seed"]) == (4, 1)


def test_base_novel_splits_five_classes_three_and_two_relabeled() -> None:
    ds = synthetic([2, 1, 3, 1, 2])

    base, novel = data.base_novel(ds)

    assert base.classnames == ["class 0", "class 1", "class 2"]
    assert novel.classnames == ["class 3", "class 4"]
    assert sorted(set(base.labels())) == [0, 1, 2] and len(base) == 6
    assert novel.labels() == [0, 1, 1]
    assert all(s.classname == novel.classnames[s.label] for s in novel.samples)
    assert (base.identity()["classes"], novel.identity()["classes"]) == ("base", "novel")


def test_few_shot_commutes_with_taking_the_base_classes() -> None:
    ds = synthetic([9, 9, 9, 9])
    base_first = data.base_novel(ds)[0].few_shot(3, seed=5)
    shots_first = data.base_novel(ds.few_shot(3, seed=5))[0]
    assert base_first.samples == shots_first.samples


def test_subset_classes_without_relabel_keeps_original_labels() -> None:
    ds = synthetic([1, 1, 1])
    sub = ds.subset_classes([2, 0], relabel=False)
    assert sub.labels() == [0, 2] and sub.classnames == ds.classnames
    assert ds.subset_classes([2, 0]).labels() == [0, 1]


def test_identity_is_stable_and_follows_the_data(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        write(tmp_path / cls / "0.png", 0)
    first, again = data.image_folder(tmp_path).identity(), data.image_folder(tmp_path).identity()
    assert first == again
    assert json.loads(json.dumps(first)) == first  # fits in a JSON manifest
    assert (first["source"], first["num_classes"], first["num_samples"]) == ("image_folder", 2, 2)

    write(tmp_path / "dog" / "1.png", 1)
    assert data.image_folder(tmp_path).identity()["sha256"] != first["sha256"]

    upload = data.uploaded_set([(png(1), "a"), (png(2), "b")], LIMITS).identity()
    changed = data.uploaded_set([(png(1), "a"), (png(3), "b")], LIMITS).identity()
    assert upload["sha256"] != changed["sha256"]


# --- transforms and loading ----------------------------------------------------------------


def test_train_transform_is_random_crop_and_flip_at_the_backbone_size(
    backbone: ClipBackbone,
) -> None:
    image = Image.open(io.BytesIO(png(4, size=(64, 48)))).convert("RGB")
    train, evaluate = data.train_transform(backbone), data.eval_transform(backbone)

    torch.manual_seed(0)
    x0 = train(image)
    torch.manual_seed(0)
    x0_again = train(image)
    torch.manual_seed(1)
    x1 = train(image)

    assert x0.shape == (3, 32, 32) and x0.dtype == torch.float32
    assert torch.equal(x0, x0_again)
    assert not torch.allclose(x0, x1)
    assert torch.equal(evaluate(image), evaluate(image))
    assert evaluate(image).shape == (3, 32, 32)
    # Both normalize with the backbone's statistics: a white image maps to the same value.
    white = Image.new("RGB", (64, 48), (255, 255, 255))
    assert torch.allclose(train(white), evaluate(white), atol=1e-5)


def test_loader_yields_batches_from_files_and_bytes(tmp_path: Path, backbone) -> None:
    for cls in ("cat", "dog"):
        for i in range(3):
            write(tmp_path / cls / f"{i}.png", i)
    folder = data.image_folder(tmp_path)
    upload = data.uploaded_set([(png(i), f"c{i % 2}") for i in range(5)], LIMITS)

    batches = list(data.loader(folder, data.train_transform(backbone), 4, True, seed=0))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0, 0, 0, 1, 1, 1]

    def order(seed: int) -> list[int]:
        return torch.cat(
            [y for _, y in data.loader(upload, data.eval_transform(backbone), 2, True, seed=seed)]
        ).tolist()

    assert order(3) == order(3)
    x, y = next(iter(data.loader(upload, data.eval_transform(backbone), 5, False, seed=0)))
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [0, 1, 0, 1, 0]


def test_dataset_refuses_an_oversize_file_before_reading_it(tmp_path: Path) -> None:
    path = write(tmp_path / "big.png", 0)
    ds = LabeledSet([Sample(path, None, 0, "x")], ["x"])
    small = ImageLimits(max_bytes=16)
    with pytest.raises(errors.ImageTooLarge, match=r"big\.png"):
        data.TorchDataset(ds, lambda im: torch.zeros(3), limits=small)[0]
