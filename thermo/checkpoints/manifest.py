"""The files on disk: ``RUN/manifest.json`` (read, checked and written here, rebuilt by
`rebuild_manifest`), the step folders and the name of each folder's ``thermo.json``."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thermo._io import RunDirError, atomic_write_json, read_json
from thermo.checkpoints.backends import CheckpointBackend, DCPBackend, backend_name
from thermo.checkpoints.config import CheckpointConfig

if TYPE_CHECKING:
    from thermo.checkpoints.checkpoints import Checkpoints

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "thermo.manifest"
MANIFEST_VERSION = 1
STATE_NAME = "thermo.json"
STATE_FORMAT = "thermo.checkpoint"
HEALTH = ("pending", "good", "bad")
_STEP_DIR = re.compile(r"step_\d{8,}")


@dataclass(frozen=True)
class CheckpointEntry:
    """One committed checkpoint (a row of ``manifest.json``; fields in the package docstring)."""

    step: int
    path: str
    health: str
    time: float
    world_size: int
    data: Any = None
    note: str = ""


def rebuild_manifest(
    run_dir: str | os.PathLike, folder: str = "checkpoints", backend: CheckpointBackend | None = None
) -> list[CheckpointEntry]:
    """Recreate a lost ``manifest.json`` from the intact checkpoint folders, all as *pending*.

    Refuses to overwrite an existing manifest. Torn folders (judged by `backend`, default
    `DCPBackend`) are left out (and left on disk).
    """
    backend = backend if backend is not None else DCPBackend()
    run_dir = Path(run_dir)
    manifest = run_dir / MANIFEST_NAME
    if manifest.exists():
        raise RunDirError(f"{manifest} exists; move it away first to rebuild it")
    entries = []
    for f in _step_folders(run_dir / CheckpointConfig(folder=folder).folder):
        if _torn(f, backend) is not None:
            continue
        meta = read_json(f / STATE_NAME, "checkpoint state", "Leave it out: move that folder away.")
        entries.append(
            CheckpointEntry(
                step=int(f.name[len("step_") :]),
                path=f"{folder}/{f.name}",
                health="pending",
                time=f.stat().st_mtime,
                world_size=int(meta.get("world_size", 0)),
                data=(meta.get("data") or [None])[0],
                note="rebuilt by rebuild_manifest: health unknown",
            )
        )
    _write_manifest(manifest, entries, backend_name(backend))
    return entries


def recorded_backend(run_dir: str | os.PathLike) -> str | None:
    """The `CheckpointBackend.name` a run's manifest records (None: no manifest, or one written
    before thermo recorded it, which is DCP's). For a process that reads checkpoints it cannot
    load, such as ``thermo supervise``."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    obj = read_json(path, "checkpoint manifest", "Restore it from a backup or fix it.")
    name = obj.get("backend") if isinstance(obj, dict) else None
    return name if isinstance(name, str) else None


def _write_manifest(path: Path, entries: list[CheckpointEntry], backend: str) -> None:
    atomic_write_json(
        path,
        {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "backend": backend,  # who fills the folders (CheckpointBackend.name)
            "checkpoints": [asdict(e) for e in sorted(entries, key=lambda e: e.step)],
        },
    )


def _torn(path: Path, backend: CheckpointBackend) -> str | None:
    if not path.is_dir():
        return "its folder is missing"
    if not (path / STATE_NAME).is_file():
        return f"{STATE_NAME} is missing: the save did not finish or files were deleted"
    return backend.torn(path)

def _step_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name))


def _parse_manifest(obj: Any, ckpts: Checkpoints, fix: str) -> list[CheckpointEntry]:
    path = ckpts.manifest_path
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
        raise RunDirError(
            f'{path} is not a thermo checkpoint manifest (no "format": "{MANIFEST_FORMAT}"). {fix}'
        )
    version = obj.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise RunDirError(
            f"{path} has manifest version {version!r}; this thermo reads up to {MANIFEST_VERSION}. "
            "Upgrade thermo to read it."
        )
    rows = obj.get("checkpoints")
    if not isinstance(rows, list):
        raise RunDirError(f'{path}: "checkpoints" must be a list. {fix}')
    names = {f.name for f in fields(CheckpointEntry)}
    entries = []
    root = ckpts.run_dir.resolve()
    for n, row in enumerate(rows):
        try:
            e = CheckpointEntry(**{k: v for k, v in row.items() if k in names})
            ok = (
                isinstance(e.step, int)
                and e.step >= 0
                and e.health in HEALTH
                and isinstance(e.path, str)
                # Retention deletes these folders: never anything outside the run directory.
                and (root / e.path).resolve().parent.is_relative_to(root)
                and _STEP_DIR.fullmatch(Path(e.path).name) is not None
            )
        except (TypeError, AttributeError):
            ok = False
        if not ok:
            raise RunDirError(f"{path}: checkpoint entry {n} is malformed ({json.dumps(row)[:200]}). {fix}")
        entries.append(e)
    if len({e.step for e in entries}) != len(entries):
        raise RunDirError(f"{path} lists a step twice. {fix}")
    return sorted(entries, key=lambda e: e.step)
