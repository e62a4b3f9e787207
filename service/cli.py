"""`promptserve` command line: the same names as Settings; flags override PROMPTSERVE_* vars."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.errors import PromptServeError
from service.settings import Settings


def _backbone_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", choices=["clip", "llava"], help="clip (default) or llava")
    p.add_argument("--model", help="open_clip architecture (default ViT-B-32)")
    p.add_argument("--pretrained", help="openai | other open_clip tag | PATH | none")
    p.add_argument("--model-config", dest="model_config_path", help="ARCH.json custom model")
    p.add_argument("--device")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"])


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    fields = Settings.model_fields
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if overrides.get("model_config_path") and "model" not in overrides:
        overrides["model"] = Path(overrides["model_config_path"]).stem
    return Settings(**overrides)


def load_backbone(settings: Settings) -> Any:
    from service.app import load_backbone as load

    return load(settings)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service import server
    from service.app import create_app
    from service.settings import LOOPBACK

    settings = settings_from(args)
    log = logging.getLogger("promptserve")
    if not settings.auth_enabled:
        if settings.host not in LOOPBACK and not settings.allow_insecure:
            print(
                f"error (insecure_bind): no API keys are configured, so promptserve listens on "
                f"loopback only; refusing to bind {settings.host}. Set PROMPTSERVE_API_KEYS / "
                "PROMPTSERVE_ADMIN_KEYS, or pass --allow-insecure to serve without keys.",
                file=sys.stderr,
            )
            return 2
        log.warning("auth: none (no API keys configured); listening on %s", settings.host)
    # Load the backbone before binding, so missing weights are a clear error, not a crash loop.
    backbone = load_backbone(settings)
    app = create_app(settings, backbone=backbone)
    uvicorn.Server(server.config(app, settings)).run()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from service.importers.dassl import import_dassl

    settings = settings_from(args)
    if args.method == "m2pt":
        return _import_m2pt(args, settings)
    if not args.classnames:
        print("error (bad_request): --classnames FILE is required for this method", file=sys.stderr)
        return 2
    classnames = [
        line.strip() for line in Path(args.classnames).read_text().splitlines() if line.strip()
    ]
    ckpt, data = import_dassl(
        args.src,
        name=args.name,
        classnames=classnames,
        backbone=load_backbone(settings),
        method=args.method,
        ctx_init=args.ctx_init,
        class_token_position=args.class_token_position,
    )
    out = Path(args.out or f"{args.name}.safetensors")
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    m = ckpt.manifest
    print(f"wrote {out}: {m.method} checkpoint {m.name!r}, {len(m.classnames)} classes")
    return 0


def _import_m2pt(args: argparse.Namespace, settings: Settings) -> int:
    """M²PT (William-wAng618/M2PT output directory or weights file) onto a LLaVA backbone."""
    from service.importers.m2pt import import_m2pt

    if settings.backbone != "llava":
        settings = settings.model_copy(update={"backbone": "llava"})
    ckpt, data = import_m2pt(
        args.src, name=args.name, backbone=load_backbone(settings), projector=args.projector
    )
    out = Path(args.out or f"{args.name}.safetensors")
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    cfg = ckpt.manifest.method_config
    projector = "trained" if cfg["train_projector"] else "frozen"
    print(
        f"wrote {out}: m2pt checkpoint {ckpt.manifest.name!r}, {cfg['n_visual']} visual and "
        f"{cfg['n_text']} textual prompt tokens, projector {projector}"
    )
    return 0


def _pairs(items: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE flags -> dict, values parsed as JSON where they parse (numbers, booleans)."""
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _spec(args: argparse.Namespace) -> Any:
    from service.training.runs import DatasetSpec, TrainSpec

    return TrainSpec(
        name=args.name,
        method=args.method,
        dataset=DatasetSpec(
            kind=args.dataset, root=args.root, split_file=args.split_file, domain=args.domain
        ),
        method_config=_pairs(args.config),
        recipe=_pairs(args.recipe),
        shots=args.shots,
        seed=args.seed,
        base_to_novel=args.base_to_novel,
        activate=not args.no_activate,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from prompts_store import open_store
    from service.training.datasets import load_data
    from service.training.runs import run

    settings = settings_from(args)
    spec = _spec(args)
    backbone = load_backbone(settings)
    store = open_store(settings.store)
    bar = tqdm(total=None, unit="epoch", desc=f"{spec.method} {spec.name}")

    def progress(row: dict[str, Any]) -> None:  # every epoch's end, and every second within one
        bar.total = row["epochs"]
        bar.n = row["epoch"] if row.get("epoch_end") else row["epoch"] - 1
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.3f}", step=row["step"])

    try:
        result = run(
            spec, backbone, store, load_data, out_dir=Path(args.out_dir), progress=progress
        )
    finally:
        bar.close()
        store.close()
    p = result.published
    print(
        f"published {p.name} v{p.version} ({p.method}, active={p.active}); curves: {result.curves}"
    )
    for key, value in result.metrics.items():
        if isinstance(value, dict) and "accuracy" in value:
            print(f"  {key}: accuracy {value['accuracy']:.4f} on {value['n']} images")
        elif key == "hm":
            print(f"  harmonic mean: {value:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from prompts_store import open_store
    from service.checkpoints import dump, load
    from service.engine.publish import publish
    from service.engine.store_errors import store_errors
    from service.training.datasets import load_data
    from service.training.runs import DatasetSpec, TrainSpec, evaluate_sets, summary

    settings = settings_from(args)
    backbone = load_backbone(settings)
    src = Path(args.src)
    store = None
    if src.suffix == ".safetensors" and src.exists():
        data = src.read_bytes()
    else:
        from service.engine.residency import parse_ref

        store = open_store(settings.store)
        name, version = parse_ref(args.src)
        with store_errors():
            stored = store.get(name, version)
        data, version = stored.data, stored.version
    ckpt = load(data, backbone)
    m = ckpt.manifest
    spec = TrainSpec(
        name=m.name,
        method=m.method,
        method_config=m.method_config,
        templates=m.templates,
        dataset=DatasetSpec(
            kind=args.dataset, root=args.root, split_file=args.split_file, domain=args.domain
        ),
        base_to_novel=args.base_to_novel,
        shots=None,
    )
    metrics = evaluate_sets(backbone, spec, ckpt.params, load_data(spec, backbone, 64).evals)
    print(json.dumps(metrics, indent=1))
    updated = m.model_copy(update={"metrics": {**m.metrics, **summary(metrics)}})
    out = dump(ckpt.params, updated)
    if store is None:
        tmp = src.with_suffix(".safetensors.tmp")
        tmp.write_bytes(out)
        tmp.replace(src)
        print(f"metrics written into {src}")
    else:
        published = publish(store, backbone, out, activate=False)
        print(
            f"metrics written into {published.name} v{published.version} (not activated; "
            f"evaluated v{version})"
        )
        store.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.training.jobs import context_from_settings, queue_url_for, run_worker, set_context

    settings = settings_from(args)
    url = queue_url_for(settings.queue, settings.store)
    if url is None:
        print(
            "error (not_ready): the worker needs a Redis queue: set PROMPTSERVE_QUEUE=redis://... "
            "(or use a redis:// store)",
            file=sys.stderr,
        )
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else None
    set_context(lambda: context_from_settings(settings, out_dir))  # flags, not only the env
    run_worker(url, burst=args.burst)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Offline demo: the proving-ground backbone, three trained checkpoints, the service."""
    from service.demo import run_demo

    return run_demo(args.store or "file://var/demo/store", args.port or 8000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the HTTP service")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--store", help="file://DIR or redis://HOST:PORT/DB")
    s.add_argument(
        "--allow-insecure",
        dest="allow_insecure",
        action="store_const",
        const=True,
        help="serve a non-loopback address without API keys",
    )
    s.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    s.add_argument("--runtime", choices=["auto", "torch", "onnx", "cudagraph"])
    s.add_argument("--max-wait-ms", dest="max_wait_ms", type=float)
    _backbone_flags(s)
    s.set_defaults(func=cmd_serve)
    t = sub.add_parser("train", help="train a prompt checkpoint in the foreground and publish it")
    t.add_argument("--name", required=True)
    t.add_argument(
        "--method",
        required=True,
        choices=["coop", "cocoop", "vpt", "ivlp", "promptsrc", "maple", "bias", "dualview"],
    )
    t.add_argument(
        "--dataset", required=True, choices=["image_folder", "coop_split", "proving_ground"]
    )
    t.add_argument("--root", help="dataset root (image_folder, coop_split)")
    t.add_argument("--split-file", help="split_zhou_<Dataset>.json (coop_split)")
    t.add_argument("--domain", help="proving-ground domain")
    t.add_argument("--shots", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--base-to-novel", action="store_true")
    t.add_argument("--no-activate", action="store_true")
    t.add_argument("--config", nargs="*", help="method config KEY=VALUE")
    t.add_argument("--recipe", nargs="*", help="recipe overrides KEY=VALUE (epochs=5 ...)")
    t.add_argument("--store")
    t.add_argument("--out-dir", default="var/runs", help="curves and run records")
    _backbone_flags(t)
    t.set_defaults(func=cmd_train)
    w = sub.add_parser("worker", help="run training jobs from the Redis queue")
    w.add_argument("--queue", help="redis://HOST:PORT/DB (default: the store's, if redis://)")
    w.add_argument("--store", help="where checkpoints are published: file://DIR or redis://...")
    w.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    w.add_argument("--out-dir", help="keep each run's curves and run.json here")
    _backbone_flags(w)
    w.set_defaults(func=cmd_worker)
    d = sub.add_parser("demo", help="offline demo: proving ground, trained checkpoints, service")
    d.add_argument("--store", help="default file://var/demo/store")
    d.add_argument("--port", type=int)
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("eval", help="accuracy of a checkpoint on a dataset, into its manifest")
    e.add_argument("src", help="a .safetensors file, or a stored name[@version]")
    e.add_argument(
        "--dataset", required=True, choices=["image_folder", "coop_split", "proving_ground"]
    )
    e.add_argument("--root")
    e.add_argument("--split-file")
    e.add_argument("--domain")
    e.add_argument("--base-to-novel", action="store_true")
    e.add_argument("--store")
    _backbone_flags(e)
    e.set_defaults(func=cmd_eval)
    p = sub.add_parser("import", help="convert a reference (Dassl .pth, M²PT) checkpoint")
    p.add_argument(
        "src",
        help="model.pth.tar-N of CoOp/CoCoOp/MaPLe/VPT/IVLP/PromptSRC, or M2PT's output dir/file",
    )
    p.add_argument(
        "--method", choices=["coop", "cocoop", "vpt", "ivlp", "maple", "promptsrc", "m2pt"]
    )
    p.add_argument("--name", required=True)
    p.add_argument("--classnames", help="text file, one class name per line (not for m2pt)")
    p.add_argument(
        "--projector",
        default="auto",
        choices=["auto", "yes", "no"],
        help="m2pt: keep the trained projector (auto: when it differs from the backbone's)",
    )
    p.add_argument(
        "--ctx-init",
        default=None,
        help="the run's CTX_INIT (default: none for CoOp/CoCoOp, 'a photo of a' otherwise)",
    )
    p.add_argument(
        "--class-token-position",
        choices=["end", "middle", "front"],
        help="CoOp's CLASS_TOKEN_POSITION (default: the run directory's ctp..., else end)",
    )
    p.add_argument("--out", help="output .safetensors (default NAME.safetensors)")
    _backbone_flags(p)
    p.set_defaults(func=cmd_import)
    from service.admin_cli import add_parser as add_checkpoints_parser

    add_checkpoints_parser(sub).set_defaults(func=cmd_checkpoints)
    from service.admin_cli import add_export_arguments

    x = sub.add_parser("export", help="write a stored checkpoint version to a file")
    add_export_arguments(x)
    x.add_argument("--store", help="file://DIR or redis://HOST:PORT/DB")
    x.add_argument("--json", action="store_true", help="machine-readable output")
    x.set_defaults(func=cmd_checkpoints, action="export")
    return parser


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """Operator commands on the store (service/admin_cli.py)."""
    from service.admin_cli import cmd_checkpoints as run_checkpoints

    return run_checkpoints(args, settings_from(args).store)


def _configure_logging(args: argparse.Namespace) -> None:
    """Log format and level from the settings (PROMPTSERVE_LOG_FORMAT / _LOG_LEVEL)."""
    from pydantic import ValidationError

    from service.logs import configure

    try:
        settings = settings_from(args)
    except ValidationError:  # the command reports bad settings itself; log plainly meanwhile
        configure("text")
        return
    configure(settings.log_format, settings.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        return int(args.func(args))
    except PromptServeError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
