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

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import prompts_store as ps
from service import errors
from service.engine.store_errors import store_errors

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


def cmd_checkpoints(args: argparse.Namespace, store_url: str) -> int:
    """Run one `promptserve checkpoints` action against the store at `store_url`."""
    store = ps.open_store(store_url)
    try:
        with store_errors():
            if args.action == "list":
                _print(list_names(store), args.json, NAME_COLUMNS)
            elif args.action == "versions":
                _print(list_versions(store, args.name), args.json, VERSION_COLUMNS)
            elif args.action in ("activate", "rollback"):
                if args.action == "activate":
                    out = activate(store, args.name, args.version, args.expected)
                else:
                    out = rollback(store, args.name, args.to)
                if args.json:
                    print(json.dumps(out))
                else:
                    print(f"{out['name']}: v{out['previous']} -> v{out['version']} (active)")
            elif args.action == "export":
                done = export(store, args.ref, Path(args.out), args.force)
                print(json.dumps(done) if args.json else f"{args.ref} -> {done['out']} "
                      f"(v{done['version']}, {done['bytes']} bytes)")  # fmt: skip
            elif args.action == "delete":
                if not args.yes:
                    print(f"refusing to delete {args.name!r} without --yes", file=sys.stderr)
                    return 2
                store.delete(args.name)
                print(f"deleted {args.name} (every version)")
    finally:
        store.close()
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `checkpoints` on the CLI's subparsers; the caller sets its func."""
    common = argparse.ArgumentParser(add_help=False)  # accepted after the action
    common.add_argument(
        "--store", help="file://DIR or redis://HOST:PORT/DB (default PROMPTSERVE_STORE)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    c = sub.add_parser("checkpoints", help="list, activate, roll back, delete stored checkpoints")
    acts = c.add_subparsers(dest="action", required=True)
    acts.add_parser("list", parents=[common], help="names, current version, method")
    v = acts.add_parser("versions", parents=[common], help="every version of NAME")
    v.add_argument("name")
    a = acts.add_parser("activate", parents=[common], help="make VERSION current")
    a.add_argument("name")
    a.add_argument("version", type=int)
    a.add_argument("--expected", type=int, help="only if the current version is this (0: none)")
    r = acts.add_parser("rollback", parents=[common], help="back to the version before current")
    r.add_argument("name")
    r.add_argument("--to", type=int, help="this version instead")
    add_export_arguments(acts.add_parser("export", parents=[common], help="write one to a file"))
    d = acts.add_parser("delete", parents=[common], help="remove NAME and every version")
    d.add_argument("name")
    d.add_argument("--yes", action="store_true", help="really delete")
    return c


def add_export_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("ref", help="NAME (the current version) or NAME@VERSION")
    e.add_argument("--out", required=True, help="the .safetensors file to write")
    e.add_argument("--force", action="store_true", help="overwrite an existing file")
