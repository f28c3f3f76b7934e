"""The files on disk: ``RUN/manifest.json`` (read, checked and written here, rebuilt by
`rebuild_manifest`), the step folders and the name of each folder's ``thermo.json``."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thermo._io import RunDirError, atomic_write_json, read_json
from thermo.checkpoints.backends import CheckpointBackend, DCPBackend, backend_name
from thermo.checkpoints.config import CheckpointConfig
from thermo.rundir import RunDir

if TYPE_CHECKING:
    from thermo.checkpoints.checkpoints import Checkpoints

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
    # relative path in the folder -> [size in bytes, sha256 hex] of every file, taken while
    # saving; None for checkpoints from before thermo recorded them (judged by sizes only).
    files: dict[str, list] | None = None


def rebuild_manifest(
    run_dir: str | os.PathLike, folder: str = RunDir.CHECKPOINTS, backend: CheckpointBackend | None = None
) -> list[CheckpointEntry]:
    """Recreate a lost ``manifest.json`` from the intact checkpoint folders, all as *pending*.

    Refuses to overwrite an existing manifest. Torn folders (judged by `backend`, default
    `DCPBackend`) are left out (and left on disk).
    """
    backend = backend if backend is not None else DCPBackend()
    run = RunDir(run_dir)
    manifest = run.manifest
    if manifest.exists():
        raise RunDirError(f"{manifest} exists; move it away first to rebuild it")
    entries = []
    for f in _step_folders(run.checkpoints_dir(CheckpointConfig(folder=folder).folder)):
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
    path = RunDir(run_dir).manifest
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


def _torn(path: Path, backend: CheckpointBackend, files: dict[str, list] | None = None) -> str | None:
    """Why the folder at `path` cannot be loaded, or None. Reads no pickle: presence, sizes,
    ``thermo.json`` (JSON) and, where the manifest recorded them, every file's checksum."""
    if path.is_symlink():
        return "it is a symlink, and thermo never writes one: refused (it could point anywhere)"
    if not path.is_dir():
        return "its folder is missing"
    state = path / STATE_NAME
    if not state.is_file() or state.is_symlink():
        return f"{STATE_NAME} is missing: the save did not finish or files were deleted"
    try:
        meta = json.loads(state.read_text())
    except (OSError, ValueError, RecursionError):
        return f"{STATE_NAME} is empty or not valid JSON"
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        return f"{STATE_NAME} is not a thermo checkpoint state"
    if files is not None:
        why = _verify(path, files)
        if why is not None:
            return why
    return backend.torn(path)


def _file_list(path: Path) -> list[str]:
    """Every regular file under the folder, relative, sorted (what the checksums cover)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _digest(f: Path) -> list:
    with open(f, "rb") as fh:
        return [os.fstat(fh.fileno()).st_size, hashlib.file_digest(fh, "sha256").hexdigest()]


# (folder, file, size, mtime_ns) -> digest: a file verified or written by this process is not
# read again while it stays unchanged (a supervisor judges the same folders after every launch).
_verified: dict[tuple[str, str, int, int], list] = {}


def _checksum(path: Path, rel: str) -> list:
    f = path / rel
    st = f.stat()
    key = (str(path), rel, st.st_size, st.st_mtime_ns)
    if key not in _verified:
        _verified[key] = _digest(f)
    return _verified[key]


def _verify(path: Path, files: dict[str, list]) -> str | None:
    for rel, (size, digest) in sorted(files.items()):
        f = path / rel
        if f.is_symlink() or not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were saved"
        if _checksum(path, rel)[1] != digest:
            return f"{rel} does not match the checksum taken when it was saved (the file changed or is corrupt)"
    return None


def _step_folders(folder: Path) -> list[Path]:
    """The step folders (and symlinks planted under a step folder's name) in `folder`."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if (p.is_dir() or p.is_symlink()) and _STEP_DIR.fullmatch(p.name))


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
    for n, row in enumerate(rows):
        try:
            e = CheckpointEntry(**{k: v for k, v in row.items() if k in names})
            ok = (
                isinstance(e.step, int)
                and e.step >= 0
                and e.health in HEALTH
                and isinstance(e.path, str)
                # Retention deletes these folders: never anything outside the run directory. Checked
                # on the path as written, so that RUN/checkpoints may be a symlink to another disk.
                and not Path(e.path).is_absolute()
                and ".." not in Path(e.path).parts
                and _STEP_DIR.fullmatch(Path(e.path).name) is not None
                and (e.files is None or _files_ok(e.files))
            )
        except (TypeError, AttributeError):
            ok = False
        if not ok:
            raise RunDirError(f"{path}: checkpoint entry {n} is malformed ({json.dumps(row)[:200]}). {fix}")
        entries.append(e)
    if len({e.step for e in entries}) != len(entries):
        raise RunDirError(f"{path} lists a step twice. {fix}")
    return sorted(entries, key=lambda e: e.step)


def _files_ok(files: Any) -> bool:
    return isinstance(files, dict) and all(
        isinstance(rel, str) and not Path(rel).is_absolute() and ".." not in Path(rel).parts
        and isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
        for rel, v in files.items()
    )
