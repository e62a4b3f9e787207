"""`promptserve demo` (`make demo`): offline, on a fresh machine with no weights.

The proving-ground CLIP (pre-trained by our own code on first use, cached), three checkpoints
trained on shifted domains into the embedded store, then what they are worth: zero-shot against
each checkpoint on its domain's whole test set, and a few test images drawn at random (seeded)
with their true labels beside the answers; then the service, with requests that work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.backbones.clip import ClipBackbone
from service.prompts.base import Plan
from service.settings import Settings

# name, method, proving-ground domain, method config over recipes.PROVING_CONFIG. The domains
# are camera shifts a small prompt can correct (docs/METHODS.md): under-exposure for the
# vision-side methods, rotated colour channels for CoOp's text-side context.
DEMO_CHECKPOINTS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("dusk-bias", "bias", "dusk", {}),
    ("dusk-maple", "maple", "dusk", {"n_ctx": 4}),
    ("falsecolour-coop", "coop", "falsecolour", {}),
)
SHOWCASE_PER_DOMAIN = 4
SHOWCASE_SEED = 0  # fixed before the first look at the answers; never chosen by them
TEST_PER_CLASS = 50  # the test set every run of the proving ground reports on (datasets.py)
ZERO_SHOT = "zero-shot"


@dataclass
class Row:
    """One checkpoint on its domain's test set: zero-shot's accuracy and the checkpoint's."""

    name: str
    method: str
    domain: str
    version: int
    zero_shot: float
    accuracy: float
    n: int


@dataclass
class Shown:
    """One showcased test image: where it was saved, its true label, the top-1 answers."""

    path: Path
    domain: str
    label: str
    answers: dict[str, str] = field(default_factory=dict)  # checkpoint (or "zero-shot") -> label


@dataclass
class Demo:
    settings: Settings
    backbone: ClipBackbone
    images: Path
    rows: list[Row]
    shown: list[Shown]
    classnames: Path  # a JSON list of the 32 class names, for the ad-hoc zero-shot request


def prepare(store_url: str, port: int, root: Path = Path("var/demo")) -> Demo:
    """Backbone, checkpoints (those already in the store are kept), figures, example images."""
    from prompts_store import open_store
    from service.training import proving_ground as pg

    print("proving-ground backbone (pre-trained on first use, about 2 minutes; cached)...")
    backbone = pg.build_backbone(progress=lambda row: print(f"  pre-training {row}"))
    store = open_store(store_url)
    try:
        _train_missing(store, backbone, root)
        plans = {name: _current_plan(store, backbone, name) for name, *_ in DEMO_CHECKPOINTS}
    finally:
        store.close()
    tests = {d: pg.make_dataset(d, "test", TEST_PER_CLASS) for _, _, d, _ in DEMO_CHECKPOINTS}
    zero = {d: pg.zero_shot_plan(backbone, t.classnames) for d, t in tests.items()}
    rows = [
        Row(
            name,
            method,
            domain,
            plans[name][1],
            pg.plan_accuracy(backbone, zero[domain], tests[domain]),
            pg.plan_accuracy(backbone, plans[name][0], tests[domain]),
            len(tests[domain]),
        )
        for name, method, domain, _ in DEMO_CHECKPOINTS
    ]
    images = root / "images"
    shown = _showcase(backbone, tests, zero, {n: p for n, (p, _) in plans.items()}, images)
    classnames = root / "classnames.json"
    classnames.write_text(json.dumps(list(pg.CLASSNAMES)))
    settings = Settings(
        model="proving-clip",
        model_config_path=str(pg.ARCH_PATH),  # the training child process registers it too
        pretrained=backbone.pretrained,
        store=store_url,
        runtime="torch",
        host="127.0.0.1",
        port=port,
        runs_dir=str(root / "runs"),
        examples_dir=str(images),  # the console offers them, ready to classify
    )
    return Demo(settings, backbone, images, rows, shown, classnames)


def _train_missing(store: Any, backbone: ClipBackbone, root: Path) -> None:
    from service.training.datasets import load_data
    from service.training.recipes import PROVING_CONFIG, PROVING_RECIPE
    from service.training.runs import DatasetSpec, TrainSpec, run

    for name, method, domain, config in DEMO_CHECKPOINTS:
        if name in store.names():
            continue
        spec = TrainSpec(
            name=name,
            method=method,
            method_config={**PROVING_CONFIG.get(method, {}), **config},
            shots=16,
            dataset=DatasetSpec(kind="proving_ground", domain=domain),
            recipe=PROVING_RECIPE,
        )
        result = run(spec, backbone, store, load_data, out_dir=root / "runs")
        print(
            f"trained {name} ({method}, 16 shots a class, on the {domain} domain) in "
            f"{result.result.seconds:.0f} s"
        )


def _current_plan(store: Any, backbone: ClipBackbone, name: str) -> tuple[Plan, int]:
    """The served plan of a checkpoint's current version (what a request gets), its version."""
    from service.checkpoints import load, materialize

    stored = store.get(name)
    plan = materialize(load(stored.data, backbone), backbone)
    assert isinstance(plan, Plan), "the demo's methods are CLIP methods, which serve a Plan"
    return plan, stored.version


@torch.no_grad()
def _showcase(
    backbone: ClipBackbone,
    tests: dict[str, Any],
    zero: dict[str, Plan],
    plans: dict[str, Plan],
    out: Path,
) -> list[Shown]:
    """`SHOWCASE_PER_DOMAIN` test images per domain, drawn with `SHOWCASE_SEED`, saved as PNG
    (lossless: a request for the file sees these pixels), with every answer on them."""
    from PIL import Image

    from service.engine.forward import classify
    from service.training import proving_ground as pg

    out.mkdir(parents=True, exist_ok=True)
    shown, labels = [], {}
    for domain, test in tests.items():
        gen = torch.Generator().manual_seed(pg.derived_seed(SHOWCASE_SEED, "showcase", domain))
        picks = torch.randperm(len(test), generator=gen)[:SHOWCASE_PER_DOMAIN].tolist()
        judges = {n: plans[n] for n, _, d, _ in DEMO_CHECKPOINTS if d == domain}
        judges[ZERO_SHOT] = zero[domain]
        x = pg.to_model_input(test.images[picks], backbone)
        top1 = {
            who: [plan.labels[int(row.argmax())] for row in classify(backbone, x, [plan] * len(x))]
            for who, plan in judges.items()
        }
        for j, i in enumerate(picks):
            path = out / f"{domain}-{i:04d}.png"
            Image.fromarray(test.images[i].numpy()).save(path)
            label = test.classnames[int(test.labels[i])]
            shown.append(Shown(path, domain, label, {who: top1[who][j] for who in judges}))
            labels[path.name] = {"label": label, "domain": domain, "test_index": i}
    # for people and the console: what each file is, since its name does not say
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    return shown


def report(demo: Demo) -> str:
    """The figures: accuracy per checkpoint against zero-shot, and the showcased answers."""
    lines = [
        f"Each checkpoint on its domain's test set ({demo.rows[0].n} images, 32 classes, "
        "through the serving forward):",
        f"  {'checkpoint':<22}{'method':<8}{'domain':<13}{'zero-shot':>10}{'checkpoint':>12}",
    ]
    for r in demo.rows:
        lines.append(
            f"  {f'{r.name} v{r.version}':<22}{r.method:<8}{r.domain:<13}"
            f"{r.zero_shot:>10.1%}{r.accuracy:>12.1%}  ({r.accuracy / max(r.zero_shot, 1e-9):.1f}x)"
        )
    lines += [
        "",
        f"Showcased: {SHOWCASE_PER_DOMAIN} test images a domain, drawn at random (seed "
        f"{SHOWCASE_SEED}), never picked by their answers; true labels in "
        f"{demo.images}/labels.json:",
    ]
    for s in demo.shown:
        answers = "  ".join(
            f"{who}: {label} {'✓' if label == s.label else '✗'}" for who, label in s.answers.items()
        )
        lines.append(f"  {s.path.name:<22}true: {s.label:<17}{answers}")
    return "\n".join(lines)


def examples(base: str, demo: Demo) -> str:
    """Requests that work against the demo (the test runs them and checks their answers)."""
    first = {
        d: next(s.path for s in demo.shown if s.domain == d) for _, _, d, _ in DEMO_CHECKPOINTS
    }
    domain0 = DEMO_CHECKPOINTS[0][2]
    same = [name for name, _, d, _ in DEMO_CHECKPOINTS if d == domain0]
    lines = [
        f"\npromptserve demo on {base} (Ctrl-C to stop). The console: {base}/ui",
        "",
        report(demo),
        "",
        "Try:",
        f"  curl {base}/v1/checkpoints",
    ]
    for name, _, domain, _ in DEMO_CHECKPOINTS:
        lines.append(f"  curl -F images=@{first[domain]} -F checkpoint={name} {base}/v1/classify")
    lines.append(
        f"  curl -F images=@{first[domain0]} -F 'classnames=<{demo.classnames}' "
        f"-F 'templates=[\"a photo of a {{}}.\"]' {base}/v1/classify      (zero-shot)"
    )
    for name, _, domain, _ in DEMO_CHECKPOINTS[1:]:
        lines.append(
            f"  promptserve classify --url {base} --checkpoint {name} {demo.images}/{domain}-*.png"
        )
    lines += [
        f"  python -c \"from promptserve.client import Client; r = Client('{base}').classify("
        f"['{first[domain0]}'], checkpoints={same}); "
        'print([x.predictions[0][0].label for x in r.results])"',
        f'  curl -H \'content-type: application/json\' {base}/v1/jobs -d \'{{"name": "my-dusk", '
        '"method": "vpt", "dataset": {"kind": "proving_ground", "domain": "dusk"}, '
        '"recipe": {"epochs": 10, "optimizer": "adamw", "lr": 0.03, "warmup_epochs": 0}}\'',
        f"  curl {base}/v1/jobs/<id from the line above>   (then classify with checkpoint=my-dusk)",
        f"  open {base}/ui (the console) or {base}/docs (the API)",
        "",
    ]
    return "\n".join(lines)


class DemoCommand(BaseModel):
    """offline demo: proving ground, trained checkpoints, service"""

    model_config = ConfigDict(extra="forbid")
    store: str = Field("file://var/demo/store", description="where the demo's checkpoints go")
    port: int = 8000

    def settings(self) -> Settings:
        """The environment's settings (logging) with the demo's store and port."""
        return Settings(store=self.store, port=self.port)

    def run(self) -> int:
        """`promptserve demo`: see `run_demo`."""
        return run_demo(self.store, self.port)


def run_demo(store_url: str, port: int) -> int:
    """Prepare, print the figures and the example requests, serve until Ctrl-C."""
    import uvicorn

    from service.app import create_app

    demo = prepare(store_url, port)
    print(examples(f"http://127.0.0.1:{port}", demo))
    uvicorn.run(
        create_app(demo.settings, backbone=demo.backbone),
        host=demo.settings.host,
        port=demo.settings.port,
        timeout_graceful_shutdown=int(demo.settings.shutdown_timeout_s),
        log_level="info",
    )
    return 0
