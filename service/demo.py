"""`promptserve demo` (`make demo`): offline, on a fresh machine with no weights.

The proving-ground CLIP (pre-trained by our own code on first use, cached), three checkpoints
trained on shifted domains into the embedded store, a few example images, then the service with
example requests that work, a training job among them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from service.backbones.clip import ClipBackbone
from service.settings import Settings

# name, method, proving-ground domain; configs and recipe: recipes.PROVING_*
DEMO_CHECKPOINTS = (
    ("gray-maple", "maple", "gray"),
    ("gray-bias", "bias", "gray"),
    ("noise-coop", "coop", "noise"),
)


@dataclass
class Demo:
    settings: Settings
    backbone: ClipBackbone
    images: Path


def prepare(store_url: str, port: int, root: Path = Path("var/demo")) -> Demo:
    """Backbone, checkpoints (those already in the store are kept) and example images."""
    from PIL import Image

    from prompts_store import open_store
    from service.training import proving_ground as pg
    from service.training.datasets import load_data
    from service.training.recipes import PROVING_CONFIG, PROVING_RECIPE
    from service.training.runs import DatasetSpec, TrainSpec, run

    print("proving-ground backbone (pre-trained on first use, about 2 minutes; cached)...")
    backbone = pg.build_backbone(progress=lambda row: print(f"  pre-training {row}"))
    store = open_store(store_url)
    try:
        for name, method, domain in DEMO_CHECKPOINTS:
            if name in store.names():
                continue
            spec = TrainSpec(
                name=name,
                method=method,
                method_config=PROVING_CONFIG.get(method, {}),
                shots=16,
                dataset=DatasetSpec(kind="proving_ground", domain=domain),
                recipe=PROVING_RECIPE,
            )
            result = run(spec, backbone, store, load_data, out_dir=root / "runs")
            print(
                f"trained {name} ({method} on the {domain} domain): test accuracy "
                f"{result.metrics['test']['accuracy']:.1%}"
            )
    finally:
        store.close()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    labels = {}  # the console shows each example's true label beside the answers
    for domain in ("gray", "noise"):
        sample = pg.make_dataset(domain, "demo", per_class=1, seed=7)
        for i in (0, 5, 10):
            fname = images / f"{domain}-{sample.classnames[i].replace(' ', '-')}.png"
            Image.fromarray(sample.images[i].numpy()).save(fname)
            labels[fname.name] = sample.classnames[i]
    (images / "labels.json").write_text(json.dumps(labels, indent=1))
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
    return Demo(settings, backbone, images)


def examples(base: str, images: Path) -> str:
    """Requests that work against the demo."""
    return f"""
promptserve demo on {base} (Ctrl-C to stop). Try:
  curl {base}/v1/checkpoints
  curl -F images=@{images}/gray-red-circle.png -F checkpoint=gray-maple {base}/v1/classify
  curl -F images=@{images}/gray-red-circle.png -F checkpoint=gray-bias {base}/v1/classify
  curl -F images=@{images}/noise-green-square.png -F checkpoint=noise-coop {base}/v1/classify
  curl -F images=@{images}/gray-red-circle.png -F 'classnames=["red circle","blue square"]' \\
       {base}/v1/classify
  curl -H 'content-type: application/json' {base}/v1/jobs -d '{{"name": "my-gray", \
       "method": "vpt", "dataset": {{"kind": "proving_ground", "domain": "gray"}}, \
       "recipe": {{"epochs": 10, "optimizer": "adamw", "lr": 0.03, "warmup_epochs": 0}}}}'
  curl {base}/v1/jobs/<id from the line above>      (then classify with checkpoint=my-gray)
  open {base}/ui/    (the console: the examples and checkpoints above, ready to try)
  open {base}/docs
"""


def run_demo(store_url: str, port: int) -> int:
    """Prepare, print the example requests, serve until Ctrl-C."""
    import uvicorn

    from service.app import create_app

    demo = prepare(store_url, port)
    print(examples(f"http://127.0.0.1:{port}", demo.images))
    uvicorn.run(
        create_app(demo.settings, backbone=demo.backbone),
        host=demo.settings.host,
        port=demo.settings.port,
        timeout_graceful_shutdown=int(demo.settings.shutdown_timeout_s),
        log_level="info",
    )
    return 0
