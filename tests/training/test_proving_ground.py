"""The proving ground: a deterministic world, honest splits, a cached, fingerprinted CLIP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from service.backbones.clip import ClipBackbone, fingerprint_state
from service.training import proving_ground as pg

SHORT = {"steps": 60, "batch": 128, "seed": 0}


@pytest.fixture(scope="module")
def short_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short pre-training (60 steps x 128) into a temporary cache, with its progress."""
    cache = tmp_path_factory.mktemp("proving")
    events: list[dict[str, Any]] = []
    backbone = pg.build_backbone(cache, progress=events.append, **SHORT)
    return {"cache": cache, "backbone": backbone, "events": events}


def test_world_is_deterministic_per_seed_and_split() -> None:
    a = pg.make_dataset("noise", "train", per_class=3, seed=0)
    b = pg.make_dataset("noise", "train", per_class=3, seed=0)
    assert a.images.dtype == torch.uint8 and a.images.shape == (96, 32, 32, 3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, pg.make_dataset("noise", "train", per_class=3, seed=1).images)
    assert not torch.equal(a.images, pg.make_dataset("noise", "test", per_class=3, seed=0).images)


def test_rendering_thousands_of_images_is_fast() -> None:
    import time

    start = time.perf_counter()
    ds = pg.make_dataset("checker", "test", per_class=100)
    assert len(ds) == 3200
    assert time.perf_counter() - start < 2.0


def test_classes_base_novel_and_held_out() -> None:
    ds = pg.make_dataset("gray", "test", per_class=2)
    assert len(ds.classnames) == len(pg.COLOURS) * len(pg.SHAPES) == 32
    assert ds.classnames[0] == "red circle" and ds.classnames[-1] == "white cross"
    assert all(re.fullmatch(r"[a-z]+ [a-z]+", n) for n in ds.classnames)
    assert ds.base_classes() == list(range(16)) and ds.novel_classes() == list(range(16, 32))
    novel = ds.subset(ds.novel_classes())
    assert novel.classnames == ds.classnames[16:] and novel.labels.tolist() == sorted(
        list(range(16)) * 2
    )
    # the relabeled subset holds exactly the images of those classes
    assert torch.equal(novel.images, ds.images[ds.labels >= 16])
    kept = ds.subset([3, 5], relabel=False)
    assert kept.classnames == ds.classnames and set(kept.labels.tolist()) == {3, 5}
    assert pg.HELD_OUT == ("green circle", "yellow square", "cyan triangle", "white cross")


def test_few_shot_is_seeded_and_balanced() -> None:
    ds = pg.make_dataset("source", "train", per_class=10)
    a, b, c = ds.few_shot(4, seed=0), ds.few_shot(4, seed=0), ds.few_shot(4, seed=1)
    assert torch.bincount(a.labels, minlength=32).tolist() == [4] * 32
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert len(ds.few_shot(50)) == len(ds)  # fewer than k: a class keeps all it has


def test_held_out_pairs_never_appear_in_pretraining_captions() -> None:
    captions = pg.pretraining_captions()
    held = {pg.CLASSNAMES.index(n) for n in pg.HELD_OUT}
    assert {label for label, _ in captions} == set(range(32)) - held
    for label, text in captions:
        words = set(re.findall(r"[a-z]+", text))
        named = {(c, s) for c in pg.COLOURS for s in pg.SHAPES if {c, s} <= words}
        assert named == {tuple(pg.CLASSNAMES[label].split(" "))}, text
        assert not any(tuple(n.split(" ")) in named for n in pg.HELD_OUT)


def test_domains_differ_in_the_background_only() -> None:
    labels = torch.arange(32)
    draw = {d: pg.render(labels, d, torch.Generator().manual_seed(5)) for d in pg.DOMAINS}
    source, gray = draw["source"], draw["gray"]
    back = (source == 0).all(-1)  # the black background of the source images
    assert 0.3 < back.float().mean() < 0.98
    assert (gray[back] == 128).all()  # same shapes, same places: only the background moved
    assert torch.equal(gray[~back], source[~back])
    checker = draw["checker"][back]
    assert set(checker[:, 0].unique().tolist()) == {40, 150}
    noise = draw["noise"][back].float()
    assert noise.std() > 20 and noise.mean() > 15  # black clipped below: the mean rises
    for target in ("gray", "noise", "checker"):
        assert (draw[target].float() - source.float()).abs().mean() > 15, target


def test_camera_domains_are_the_source_scene_through_another_camera() -> None:
    labels = torch.arange(32)
    draw = {d: pg.render(labels, d, torch.Generator().manual_seed(5)) for d in pg.DOMAINS}
    source = draw["source"].float()
    # dusk: every pixel at half the light (rounded as the uint8 image is)
    assert torch.equal(draw["dusk"], (source * 0.5).round().to(torch.uint8))
    assert (source - draw["dusk"].float()).abs().mean() > 5  # a real shift, not a rounding
    # falsecolour: the channels rotated, the scene otherwise unchanged
    assert torch.equal(draw["falsecolour"], draw["source"][..., [2, 0, 1]])
    assert not torch.equal(draw["falsecolour"], draw["source"])


def test_to_model_input_agrees_with_the_backbone_preprocess(short_build: dict[str, Any]) -> None:
    backbone: ClipBackbone = short_build["backbone"]
    images = pg.make_dataset("checker", "test", per_class=1).images[:4]
    ours = pg.to_model_input(images, backbone)
    theirs = torch.stack([backbone.preprocess(Image.fromarray(im.numpy())) for im in images])
    assert ours.shape == (4, 3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_recipe_key_and_cache_dir() -> None:
    base = pg.PretrainRecipe()
    assert pg.recipe_key(base) == pg.recipe_key(pg.PretrainRecipe())
    changed = [
        pg.PretrainRecipe(steps=401),
        pg.PretrainRecipe(batch=128),
        pg.PretrainRecipe(seed=1),
    ]
    assert len({pg.recipe_key(r) for r in [base, *changed]}) == 4


def test_world_version_and_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    recipe = pg.PretrainRecipe()
    before = pg.recipe_key(recipe)
    monkeypatch.setattr(pg, "WORLD_VERSION", pg.WORLD_VERSION + 1)
    bumped = pg.recipe_key(recipe)
    assert bumped != before
    monkeypatch.setattr(pg, "PRETRAIN_TEMPLATES", pg.PRETRAIN_TEMPLATES[::-1])
    assert pg.recipe_key(recipe) not in (before, bumped)  # a changed world retrains
    monkeypatch.setenv(pg.CACHE_ENV, str(tmp_path))
    assert pg.weights_path(recipe).parent == tmp_path
    assert pg.weights_path(recipe, tmp_path / "x").parent == tmp_path / "x"  # argument wins
    monkeypatch.delenv(pg.CACHE_ENV)
    assert pg.resolve_cache_dir() == Path("var/proving_ground")


def test_short_pretraining_is_cached_and_fingerprinted(short_build: dict[str, Any]) -> None:
    cache, backbone, events = short_build["cache"], short_build["backbone"], short_build["events"]
    path = pg.weights_path(pg.PretrainRecipe(**SHORT), cache)
    assert events and events[-1]["step"] == SHORT["steps"]  # it trained, once
    assert list(cache.iterdir()) == [path]  # no temporary file left behind
    assert backbone.fingerprint == fingerprint_state(load_file(str(path)))
    mtime = path.stat().st_mtime_ns
    again: list[dict[str, Any]] = []
    reloaded = pg.build_backbone(cache, progress=again.append, **SHORT)
    assert again == [] and path.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert reloaded.fingerprint == backbone.fingerprint


def test_short_pretraining_learns_the_source_domain(short_build: dict[str, Any]) -> None:
    backbone: ClipBackbone = short_build["backbone"]
    events = short_build["events"]
    assert events[-1]["loss"] < events[0]["loss"] - 1.0
    acc = pg.zero_shot_accuracy(backbone, pg.make_dataset("source", "test", per_class=10))
    assert acc > 0.2  # chance is 1/32; this seed measured 0.32 after 60 steps x 128
