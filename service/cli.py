"""`promptserve` command line: serve, worker, train, eval, import, convert-base, export, ...

The flags that set the service are derived from `Settings` (same names, kebab-case, same types and
descriptions) and override the PROMPTSERVE_* variables; pydantic-settings' CLI support builds the
parser from the command models below. Method choices come from the method registry.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_settings import (
    CliApp,
    CliPositionalArg,
    CliSubCommand,
    CliToggleFlag,
    CliVariadicArg,
    SettingsConfigDict,
    get_subcommand,
)

from service.admin_cli import Checkpoints, Export
from service.backbones.registry import load_backbone
from service.demo import DemoCommand
from service.errors import PromptServeError
from service.importers.llava_base import ConvertBase
from service.prompts.registry import METHODS, trainable
from service.remote_cli import Classify
from service.settings import LOOPBACK, Settings
from service.training.datasets import KINDS

BACKBONE = ("backbone", "model", "pretrained", "model_config_path", "device", "precision")
FLAG = {"model_config_path": "model-config"}  # documented flag names that differ from the field
FILE_DATASETS = tuple(k for kinds in KINDS.values() for k in kinds if k != "upload")


class Command(BaseModel):
    """A command; fields named as a Settings field override that setting when given."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def settings(self) -> Settings:
        """Settings from the environment, overridden by the flags that were given."""
        given = {k: v for k, v in self if k in Settings.model_fields and v is not None}
        if given.get("model_config_path") and "model" not in given:
            given["model"] = Path(given["model_config_path"]).stem
        return Settings(**given)

    def run(self) -> int:
        """Do it; the exit status."""
        raise NotImplementedError


def command(cls: type[Command], *fields: str) -> type[Command]:
    """`cls` with one optional flag per named Settings field (its type and description)."""
    flags: dict[str, Any] = {
        name: (
            Optional[Settings.model_fields[name].annotation],  # noqa: UP045 - a runtime type
            Field(None, alias=FLAG.get(name), description=Settings.model_fields[name].description),
        )
        for name in fields
    }
    return create_model(cls.__name__.lower(), __base__=cls, __doc__=cls.__doc__, **flags)


class ServeCommand(Command):
    """run the HTTP service"""

    def run(self) -> int:
        import uvicorn

        from service import server, split
        from service.app import create_app

        settings = self.settings()
        if not settings.auth_enabled:
            if settings.host not in LOOPBACK and not settings.allow_insecure:
                print(
                    f"error (insecure_bind): no API keys are configured, so promptserve listens "
                    f"on loopback only; refusing to bind {settings.host}. Set "
                    "PROMPTSERVE_API_KEYS / PROMPTSERVE_ADMIN_KEYS, or pass --allow-insecure to "
                    "serve without keys.",
                    file=sys.stderr,
                )
                return 2
            logging.getLogger("promptserve").warning(
                "auth: none (no API keys configured); listening on %s", settings.host
            )
        if (code := split.serve_if_split(settings)) is not None:
            return code  # --frontends N > 1: the supervisor served
        # Load the backbone before binding, so missing weights are a clear error, not a crash loop.
        app = create_app(settings, backbone=load_backbone(settings))
        uvicorn.Server(server.config(app, settings)).run()
        return 0


def _values(pairs: dict[str, Any]) -> dict[str, Any]:
    """KEY=VALUE flags -> dict, values parsed as JSON where they parse (numbers, booleans)."""
    out: dict[str, Any] = {}
    for key, raw in pairs.items():
        try:
            out[key] = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            out[key] = raw
    return out


class DataFlags(Command):
    """The dataset flags train and eval share."""

    root: str | None = Field(None, description="dataset root (image_folder, coop_split)")
    split_file: str | None = Field(None, description="split_zhou_<Dataset>.json; llava_json file")
    domain: str | None = Field(None, description="proving-ground domain")
    base_to_novel: CliToggleFlag[bool] = False

    def dataset(self, kind: str) -> Any:
        from service.training.runs import DatasetSpec

        return DatasetSpec.model_validate(
            {"kind": kind, "root": self.root, "split_file": self.split_file, "domain": self.domain}
        )


class TrainCommand(DataFlags):
    """train a prompt checkpoint in the foreground and publish it"""

    name: str
    method: str
    dataset_kind: str = Field(alias="dataset")
    shots: int = 16
    seed: int = 0
    no_activate: CliToggleFlag[bool] = False
    config: CliVariadicArg[dict[str, Any]] = Field(
        default_factory=dict, description="method config KEY=VALUE ..."
    )
    recipe: CliVariadicArg[dict[str, Any]] = Field(
        default_factory=dict, description="recipe overrides KEY=VALUE ... (epochs=5 ...)"
    )
    out_dir: str = Field("var/runs", description="curves and run records")

    def run(self) -> int:
        from tqdm import tqdm

        from prompts_store import open_store
        from service.training.datasets import load_data
        from service.training.runs import TrainSpec, run

        spec = TrainSpec(
            name=self.name, method=self.method, dataset=self.dataset(self.dataset_kind),
            method_config=_values(self.config), recipe=_values(self.recipe), shots=self.shots,
            seed=self.seed, base_to_novel=self.base_to_novel, activate=not self.no_activate,
        )  # fmt: skip
        settings = self.settings()
        backbone = load_backbone(settings)
        store = open_store(settings.store)
        bar = tqdm(total=None, unit="epoch", desc=f"{spec.method} {spec.name}")

        def progress(row: dict[str, Any]) -> None:  # every epoch's end, and every second within
            bar.total = row["epochs"]
            bar.n = row["epoch"] if row.get("epoch_end") else row["epoch"] - 1
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.3f}", step=row["step"])

        try:
            result = run(
                spec, backbone, store, load_data, out_dir=Path(self.out_dir), progress=progress
            )
        finally:
            bar.close()
            store.close()
        p = result.published
        print(f"published {p.name} v{p.version} ({p.method}, active={p.active}); "
              f"curves: {result.curves}")  # fmt: skip
        _print_metrics(result.metrics)
        return 0


def _print_metrics(metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
        if isinstance(value, dict) and "accuracy" in value:
            print(f"  {key}: accuracy {value['accuracy']:.4f} on {value['n']} images")
        elif key == "hm":
            print(f"  harmonic mean: {value:.4f}")
        elif not isinstance(value, dict):
            print(f"  {key}: {value}")


class EvalCommand(DataFlags):
    """accuracy of a checkpoint on a dataset, into its manifest"""

    src: CliPositionalArg[str] = Field(description="a .safetensors file, or a stored name[@v]")
    dataset_kind: str = Field(alias="dataset")

    def run(self) -> int:
        from prompts_store import open_store
        from service.checkpoints import dump, load
        from service.checkpoints.publish import publish
        from service.checkpoints.store_errors import store_errors
        from service.engine.residency import parse_ref
        from service.training.datasets import load_data
        from service.training.runs import TrainSpec, summary

        settings = self.settings()
        backbone = load_backbone(settings)
        src, store, version = Path(self.src), None, None
        if src.suffix == ".safetensors" and src.exists():
            data = src.read_bytes()
        else:
            store = open_store(settings.store)
            name, version = parse_ref(self.src)
            with store_errors():
                stored = store.get(name, version)
            data, version = stored.data, stored.version
        ckpt = load(data, backbone)
        m = ckpt.manifest
        spec = TrainSpec(
            name=m.name, method=m.method, method_config=m.method_config, templates=m.templates,
            dataset=self.dataset(self.dataset_kind), base_to_novel=self.base_to_novel, shots=None,
        )  # fmt: skip
        evaluation = load_data(spec, backbone, 64)
        metrics = evaluation.score(backbone, spec, ckpt.params, evaluation.evals)
        print(json.dumps(metrics, indent=1))
        out = dump(ckpt.params, m.model_copy(update={"metrics": {**m.metrics, **summary(metrics)}}))
        if store is None:
            tmp = src.with_suffix(".safetensors.tmp")
            tmp.write_bytes(out)
            tmp.replace(src)
            print(f"metrics written into {src}")
            return 0
        published = publish(store, backbone, out, activate=False)
        print(f"metrics written into {published.name} v{published.version} (not activated; "
              f"evaluated v{version})")  # fmt: skip
        store.close()
        return 0


class ImportCommand(Command):
    """convert a reference (Dassl .pth, M²PT) checkpoint"""

    src: CliPositionalArg[str] = Field(
        description="model.pth.tar-N of CoOp/CoCoOp/MaPLe/VPT/IVLP/PromptSRC, or M2PT's output"
    )
    method: str | None = None
    name: str
    classnames: str | None = Field(None, description="text file, one class name per line")
    drop: list[str] = Field([], description="m2pt: saved tensors (fnmatch) to leave out, recorded")
    conversation: str = Field("llava_v1", description="m2pt: its template (vicuna_v1, none, ...)")
    ctx_init: str | None = Field(None, description="CTX_INIT (CoOp/CoCoOp: none, 'a photo of a')")
    class_token_position: Literal["end", "middle", "front"] | None = Field(
        None, description="CoOp's CLASS_TOKEN_POSITION (default: the run directory's, else end)"
    )
    out: str | None = Field(None, description="output .safetensors (default NAME.safetensors)")

    def run(self) -> int:
        from service.importers import convert_file

        settings = self.settings()
        method = METHODS.get(self.method) if self.method else None
        if method is not None and settings.backbone != method.backbone_kind:
            settings = settings.model_copy(update={"backbone": method.backbone_kind})
        classnames = None
        if self.classnames:
            lines = Path(self.classnames).read_text().splitlines()
            classnames = [line.strip() for line in lines if line.strip()]
        ckpt, data, summary = convert_file(
            self.src, name=self.name, method=self.method, backbone=load_backbone(settings),
            classnames=classnames, options=self.model_dump(include=IMPORT_OPTIONS),
        )  # fmt: skip
        out = Path(self.out or f"{self.name}.safetensors")
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
        print(f"wrote {out}: {ckpt.manifest.method} checkpoint {ckpt.manifest.name!r}, {summary}")
        return 0


IMPORT_OPTIONS = {"drop", "conversation", "ctx_init", "class_token_position"}


class WorkerCommand(Command):
    """run training jobs from the Redis queue"""

    burst: CliToggleFlag[bool] = Field(False, description="exit once the queue is empty")
    out_dir: str | None = Field(None, description="keep each run's curves and run.json here")

    def run(self) -> int:
        from service.training import jobs
        from service.training.queue_conn import queue_url_for

        settings = self.settings()
        url = queue_url_for(settings.queue, settings.store)
        if url is None:
            print("error (not_ready): the worker needs a Redis queue: set PROMPTSERVE_QUEUE="
                  "redis://... (or use a redis:// store)", file=sys.stderr)  # fmt: skip
            return 2
        out_dir = Path(self.out_dir) if self.out_dir else None
        jobs.set_context(lambda: jobs.context_from_settings(settings, out_dir))  # the flags too
        jobs.run_worker(url, burst=self.burst)
        return 0


def _choices(names: Sequence[str]) -> Any:
    return Literal[tuple(names)]  # a Literal built from the registry: argparse choices


Serve = command(
    ServeCommand, "host", "port", "store", "allow_insecure", "max_batch_size", "runtime",
    "max_wait_ms", "frontends", *BACKBONE,
)  # fmt: skip
Train = create_model(
    "train", __base__=command(TrainCommand, "store", *BACKBONE), __doc__=TrainCommand.__doc__,
    method=(_choices(trainable()), ...),
    dataset_kind=(_choices(FILE_DATASETS), Field(alias="dataset")),
)  # fmt: skip
Eval = create_model(
    "eval", __base__=command(EvalCommand, "store", *BACKBONE), __doc__=EvalCommand.__doc__,
    dataset_kind=(_choices(FILE_DATASETS), Field(alias="dataset")),
)  # fmt: skip
Import = command(ImportCommand, *BACKBONE)
Worker = command(WorkerCommand, "queue", "store", *BACKBONE)


class Root(BaseModel):
    """promptserve: serve prompt-tuned zero-shot inference, train and manage checkpoints."""

    model_config = SettingsConfigDict(
        cli_prog_name="promptserve", cli_kebab_case=True, cli_hide_none_type=True,
        env_prefix="PROMPTSERVE_CLI_",  # the commands read no environment; Settings does
    )  # fmt: skip


def _sub(model: type[BaseModel], alias: str | None = None) -> Any:
    """A subcommand field for `create_model` (its help: the command's docstring)."""
    return (cast(Any, CliSubCommand)[model], Field(alias=alias, description=model.__doc__))


Promptserve = create_model(
    "promptserve", __base__=Root, __doc__=Root.__doc__, serve=_sub(Serve), worker=_sub(Worker),
    train=_sub(Train), eval=_sub(Eval), import_=_sub(Import, alias="import"), export=_sub(Export),
    convert_base=_sub(ConvertBase, alias="convert-base"), demo=_sub(DemoCommand),
    checkpoints=_sub(Checkpoints), classify=_sub(Classify),
)  # fmt: skip


class Runnable(Protocol):
    """What every command is: its settings, and running it."""

    def settings(self) -> Settings: ...

    def run(self) -> int: ...


def parse(argv: Sequence[str]) -> Runnable:
    """The command `argv` names, its flags validated (exits 2 on an unknown command or flag)."""
    # No method of that name: pydantic-settings parses and validates, and runs nothing.
    chosen: Any = CliApp.run(Promptserve, cli_args=list(argv), cli_cmd_method_name="_parse_only")
    while (deeper := get_subcommand(chosen, is_required=False)) is not None:
        chosen = deeper  # down through groups of commands (checkpoints)
    return cast(Runnable, chosen)


def _configure_logging(chosen: Runnable) -> None:
    """Log format and level from the settings (PROMPTSERVE_LOG_FORMAT / _LOG_LEVEL)."""
    from service.logs import configure

    try:
        settings = chosen.settings()
    except ValidationError:  # the command reports bad settings itself; log plainly meanwhile
        configure("text")
        return
    configure(settings.log_format, settings.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    """The `promptserve` entry point."""
    chosen = parse(sys.argv[1:] if argv is None else argv)
    _configure_logging(chosen)
    try:
        return int(chosen.run())
    except PromptServeError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
