"""`promptserve checkpoints ...`: what an operator does from a shell, straight on the store.

    promptserve checkpoints list                      names, current version, method
    promptserve checkpoints versions NAME             every version, the current one marked
    promptserve checkpoints activate NAME VERSION     move the pointer (compare-and-set)
    promptserve checkpoints rollback NAME [--to V]    back to the version before the current one
    promptserve checkpoints delete NAME --yes
    promptserve checkpoints export NAME[@VERSION] --out FILE   (also `promptserve export`)

No server is needed: these talk to the store (`--store` or PROMPTSERVE_STORE), and every serving
replica picks the change up through the store's events, as it does for the HTTP routes. `--json`
prints machine-readable output for scripts.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import CliPositionalArg, CliSubCommand, CliToggleFlag

import prompts_store as ps
from service import errors
from service.checkpoints.store_errors import store_errors
from service.settings import Settings

NAME_COLUMNS = ["name", "current", "versions", "method", "created_at"]
VERSION_COLUMNS = ["version", "current", "method", "size", "sha256", "created_at"]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = [columns] + [["-" if r.get(c) is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def list_names(store: ps.PromptStore) -> list[dict[str, Any]]:
    """One row per name: its current version, how many versions, the current one's method."""
    rows = []
    for name in store.names():
        try:
            versions = store.versions(name)
            current = store.current(name)
        except ps.NotFound:  # deleted between names() and here
            continue
        info = next((v for v in versions if v.version == current), None)
        rows.append(
            {
                "name": name,
                "current": current,
                "versions": len(versions),
                "latest": versions[-1].version if versions else None,
                "method": info.meta.get("method") if info else None,
                "created_at": _when(info.created_at) if info else None,
            }
        )
    return rows


def list_versions(store: ps.PromptStore, name: str) -> list[dict[str, Any]]:
    """Every version of `name`, oldest first."""
    current = store.current(name)
    return [
        {
            "version": v.version,
            "current": v.version == current,
            "method": v.meta.get("method"),
            "size": v.size,
            "sha256": v.sha256[:16],
            "created_at": _when(v.created_at),
            "metrics": v.meta.get("metrics") or None,
        }
        for v in store.versions(name)
    ]


def activate(
    store: ps.PromptStore, name: str, version: int, expected: int | None = None
) -> dict[str, Any]:
    """Point `name` at `version`, refusing a version made for another backbone than the current
    one (it would fail to load on every replica)."""
    infos = {v.version: v for v in store.versions(name)}
    if version not in infos:
        raise errors.NotFound(
            f"checkpoint {name!r} has no version {version}; versions: {sorted(infos)}"
        )
    current = store.current(name)
    here = infos[version].meta.get("backbone")
    there = infos[current].meta.get("backbone") if current in infos else None
    if here and there and here != there:
        raise errors.Conflict(
            f"{name} v{version} was trained for backbone {str(here)[:19]}, but the current "
            f"v{current} for {str(there)[:19]}; replicas serving that backbone cannot load it"
        )
    store.activate(name, version, expected=expected)
    return {"name": name, "version": version, "previous": current, "active": True}


def rollback(store: ps.PromptStore, name: str, to: int | None = None) -> dict[str, Any]:
    """Activate `to`, or the newest version older than the current one; compare-and-set on the
    current pointer, so a rollback racing another change fails (409) instead of undoing it."""
    current = store.current(name)
    if to is None:
        older = [v.version for v in store.versions(name) if current is None or v.version < current]
        if not older:
            raise errors.Conflict(
                f"checkpoint {name!r} has no version older than the current v{current}"
            )
        to = older[-1]
    return activate(store, name, to, expected=current if current is not None else 0)


def export(store: ps.PromptStore, ref: str, out: Path, force: bool = False) -> dict[str, Any]:
    """Write a stored version (checksum verified on read) to `out`, atomically: the file is the
    checkpoint as uploaded, ready for another store's `POST /v1/checkpoints`."""
    name, _, version = ref.partition("@")
    if version and not version.isdigit():
        raise errors.BadRequest(f"{ref!r}: a version is a number, as in name@3")
    if out.exists() and not force:
        raise errors.Conflict(f"{out} exists; pass --force to overwrite it")
    stored = store.get(name, int(version) if version else None)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(stored.data)
    tmp.replace(out)
    return {
        "name": name,
        "version": stored.version,
        "bytes": len(stored.data),
        "out": str(out),
    }


class Action(BaseModel):
    """One operator action on the store (`--store`, default PROMPTSERVE_STORE; `--json`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    store: str | None = Field(None, description="file://DIR or redis://HOST:PORT/DB")
    as_json: CliToggleFlag[bool] = Field(False, alias="json", description="machine-readable output")

    def settings(self) -> Settings:
        """Settings from the environment, the store from `--store` when given."""
        return Settings() if self.store is None else Settings(store=self.store)

    def run(self) -> int:
        """Run the action against the store; the exit status."""
        store = ps.open_store(self.settings().store)
        try:
            with store_errors():
                return self.act(store)
        finally:
            store.close()

    def act(self, store: ps.PromptStore) -> int:
        raise NotImplementedError


class List(Action):
    """names, current version, method"""

    def act(self, store: ps.PromptStore) -> int:
        _print(list_names(store), self.as_json, NAME_COLUMNS)
        return 0


class Versions(Action):
    """every version of NAME"""

    name: CliPositionalArg[str]

    def act(self, store: ps.PromptStore) -> int:
        _print(list_versions(store, self.name), self.as_json, VERSION_COLUMNS)
        return 0


class _Moved(Action):
    def report(self, out: dict[str, Any]) -> int:
        if self.as_json:
            print(json.dumps(out))
        else:
            print(f"{out['name']}: v{out['previous']} -> v{out['version']} (active)")
        return 0


class Activate(_Moved):
    """make VERSION current"""

    name: CliPositionalArg[str]
    version: CliPositionalArg[int]
    expected: int | None = Field(None, description="only if the current version is this (0: none)")

    def act(self, store: ps.PromptStore) -> int:
        return self.report(activate(store, self.name, self.version, self.expected))


class Rollback(_Moved):
    """back to the version before the current one"""

    name: CliPositionalArg[str]
    to: int | None = Field(None, description="this version instead")

    def act(self, store: ps.PromptStore) -> int:
        return self.report(rollback(store, self.name, self.to))


class Export(Action):
    """write a stored checkpoint version to a file"""

    ref: CliPositionalArg[str] = Field(description="NAME (the current version) or NAME@VERSION")
    out: str = Field(description="the .safetensors file to write")
    force: CliToggleFlag[bool] = Field(False, description="overwrite an existing file")

    def act(self, store: ps.PromptStore) -> int:
        done = export(store, self.ref, Path(self.out), self.force)
        print(json.dumps(done) if self.as_json else f"{self.ref} -> {done['out']} "
              f"(v{done['version']}, {done['bytes']} bytes)")  # fmt: skip
        return 0


class Delete(Action):
    """remove NAME and every version"""

    name: CliPositionalArg[str]
    yes: CliToggleFlag[bool] = Field(False, description="really delete")

    def act(self, store: ps.PromptStore) -> int:
        if not self.yes:
            print(f"refusing to delete {self.name!r} without --yes", file=sys.stderr)
            return 2
        store.delete(self.name)
        print(f"deleted {self.name} (every version)")
        return 0


class Checkpoints(BaseModel):
    """list, activate, roll back, delete stored checkpoints"""

    list: CliSubCommand[List] = Field(description=List.__doc__)
    versions: CliSubCommand[Versions] = Field(description=Versions.__doc__)
    activate: CliSubCommand[Activate] = Field(description=Activate.__doc__)
    rollback: CliSubCommand[Rollback] = Field(description=Rollback.__doc__)
    export: CliSubCommand[Export] = Field(description=Export.__doc__)
    delete: CliSubCommand[Delete] = Field(description=Delete.__doc__)
