"""Checks before anything is started or written (the command, the run directory, the lock), and
what the supervisor reads of the run directory between launches (checkpoints, heartbeat)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from thermo.guard import newest_usable
from thermo.rundir import RunDir
from thermo.store import Store
from thermo.supervisor.config import SupervisorError

def check_command(command: list[str]) -> None:
    """Raise `SupervisorError` unless `command` names an executable program."""
    if not command:
        raise SupervisorError("no command to supervise: give it after '--', e.g. "
                              "thermo supervise runs/a -- torchrun --nproc_per_node=2 train.py")
    prog = command[0]
    found = shutil.which(prog) if os.sep not in prog else (prog if os.access(prog, os.X_OK)
                                                           and Path(prog).is_file() else None)
    if found is None:
        raise SupervisorError(f"command not found: {prog!r} (not an executable file"
                              f"{'' if os.sep in prog else ' on PATH'}); check the command after '--'")


def _check_same_run_dir(command: list[str], run_dir: Path) -> None:
    """A command that names another run directory (``--run-dir X``) would never be seen."""
    for i, arg in enumerate(command):
        other = command[i + 1] if arg == "--run-dir" and i + 1 < len(command) else \
            arg.partition("=")[2] if arg.startswith("--run-dir=") else None
        if other and Path(other).absolute().resolve() != run_dir.resolve():
            raise SupervisorError(f"the command writes to --run-dir {other} but thermo supervise watches "
                                  f"{run_dir}: give both the same directory (or drop --run-dir: the "
                                  "command gets THERMO_RUN_DIR)")


def check_run_dir(run_dir: Path) -> None:
    """Raise a one-line error if the run directory cannot be used: not a writable folder, or its
    store, manifest or blacklist is broken, foreign or from a newer thermo. Creates the folder
    (and nothing else) only once everything else checked out."""
    from thermo.data import Blacklist

    if run_dir.exists() and not run_dir.is_dir():
        raise SupervisorError(f"run directory {run_dir} exists and is not a folder; choose another path")
    run = RunDir(run_dir)
    if run.db.exists():
        Store(run_dir, readonly=True).close()  # StoreError: foreign, torn or newer
    if run.manifest.exists() or run.checkpoints_dir().is_dir():
        _checkpoints(run_dir, must=True)  # RunDirError: broken, or folders without a manifest
    if run_dir.is_dir():
        Blacklist.load(run_dir)  # RunDirError: malformed or newer
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise SupervisorError(f"run directory {run_dir} is not writable ({e.strerror or e}); "
                              "choose a writable path") from None


def _checkpoints(run_dir: Path, must: bool = False):
    """The run's `Checkpoints`, or None where there is no manifest (a loop without a Guard)."""
    from thermo.checkpoints import Checkpoints
    from thermo.checkpoints.backends import DCPBackend
    from thermo.checkpoints.manifest import recorded_backend

    if not must and not RunDir(run_dir).manifest.exists():
        return None  # never create one: Checkpoints writes an empty manifest where none exists
    name = recorded_backend(run_dir)
    return Checkpoints(run_dir, backend=_Foreign(name) if name not in (None, DCPBackend.name) else None)


class _Foreign:
    """Stands in for a backend this process cannot build (a framework adapter's, which needs the
    live trainer or engine): a folder counts as intact when it and its ``thermo.json`` are there
    (what `Checkpoints` checks for every backend); the training process judges the rest with its
    own backend when it loads one, and falls back to an older checkpoint itself."""

    def __init__(self, name: str):
        self.name = name  # kept, so a manifest the supervisor rewrites still names its writer

    def save(self, path, model, optimizer, scheduler, rng):
        raise RuntimeError(f"thermo supervise does not write {self.name!r} checkpoints")

    def load(self, path, model, optimizer, scheduler, rng):
        raise RuntimeError(f"{self.name!r} checkpoints are loaded by the training process, not thermo supervise")

    def torn(self, path: Path) -> str | None:
        return None


def _newest_usable(run_dir: Path) -> int | None:
    """The checkpoint a Guard will resume from: the newest intact one not marked bad."""
    ckpts = _checkpoints(run_dir)
    entry = newest_usable(ckpts) if ckpts is not None else None
    return None if entry is None else entry.step


def _lock(run_dir: Path) -> int:
    """One supervisor per run directory (the lock goes with the process, however it dies)."""
    fd = os.open(RunDir(run_dir).supervise_lock, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who shares it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SupervisorError(f"another thermo supervise is already watching {run_dir}") from None
    return fd


def _read_heartbeat(run_dir: Path) -> dict | None:
    """The heartbeat, or None if it is missing or not one: it is written by the command, which
    may be anything, so every field is checked (a crafted file must not crash the supervisor)."""
    try:
        with open(RunDir(run_dir).heartbeat, "rb") as f:
            raw = f.read(1 << 20)  # a heartbeat is a few hundred bytes; never read a huge file whole
        beat = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(beat, dict):
        return None
    t, step, ids = beat.get("time"), beat.get("step", 0), beat.get("ids", [])
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return None
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**62:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**62
                                            for i in ids):
        ids = []  # the step is still a sign of life; its batch is unknown
    return {**beat, "time": float(t), "step": step, "ids": ids}
