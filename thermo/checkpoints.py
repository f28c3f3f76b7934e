"""Checkpoints through torch.distributed.checkpoint (DCP), and a manifest of their health.

One DCP folder per saved step, ``RUN/checkpoints/step_00001234/``, holding the model, the
optimizer, the LR scheduler, every rank's RNG states, and ``thermo.json`` (every rank's data
position, thermo's own state). ``RUN/manifest.json`` lists the checkpoints that count:

=========== =====================================================================================
field       meaning
=========== =====================================================================================
step        the training step after whose optimizer update the state was taken
path        the folder, relative to the run directory
health      ``pending`` when written; ``good`` once `CheckpointConfig.good_after` healthy steps
            followed it (`promote`); ``bad`` if a verdict's onset precedes it (`mark_bad`) or the
            run was rolled back to an earlier one (`restore`)
time        when it was committed (Unix seconds)
world_size  ranks that wrote it
data        rank 0's data position (e.g. `ResumableSampler.state_dict()`)
note        why it is bad, if it is
=========== =====================================================================================

A checkpoint counts only once rank 0 has committed its manifest entry, after every rank finished
writing; a folder without an entry (a save killed half-way) is never loaded and is deleted by the
next save. Only rank 0 writes files. One writer at a time: the trainer while it runs, the
supervisor or ``thermo`` between launches.

Optimizer state is stored per parameter name (DCP's ``flatten_optimizer_state_dict``), the same
layout for a plain model, DDP, FSDP2 and DDP + ZeroRedundancyOptimizer, so a checkpoint can be
restored under another parallelism or number of ranks (RNG states excepted: they are per rank).

What goes inside a folder is a `CheckpointBackend`'s business: `DCPBackend` (the default) writes
the DCP files above; a framework that owns its state writes its own (DeepSpeed's
``engine.save_checkpoint``, see ``thermo.integrations.deepspeed``). The manifest, ``thermo.json``,
health and retention are the same whatever the backend.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from thermo import _dist
from thermo._io import RunDirError, atomic_write_json, read_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "thermo.manifest"
MANIFEST_VERSION = 1
STATE_NAME = "thermo.json"
STATE_FORMAT = "thermo.checkpoint"
HEALTH = ("pending", "good", "bad")
_STEP_DIR = re.compile(r"step_\d{8,}")


@dataclass(frozen=True)
class CheckpointConfig:
    """How checkpoints are kept and judged.

    Attributes:
        keep_last: checkpoints kept that are not bad (newest first); the newest good one is kept
            on top of those, so there is always one to roll back to.
        good_after: healthy steps that must follow a checkpoint before it counts as good. Make
            it longer than the detector's onset walk-back: a checkpoint is only good if the
            sickness a later verdict finds cannot have begun before it.
        folder: folder of the checkpoints, relative to the run directory.
        rng: save and restore each rank's RNG states (python, numpy, torch CPU, CUDA).
    """

    keep_last: int = 3
    good_after: int = 50
    folder: str = "checkpoints"
    rng: bool = True

    def __post_init__(self):
        if self.keep_last < 1:
            raise ValueError(f"CheckpointConfig.keep_last must be >= 1, got {self.keep_last}")
        if self.good_after < 0:
            raise ValueError(f"CheckpointConfig.good_after must be >= 0, got {self.good_after}")
        if not self.folder or Path(self.folder).is_absolute() or ".." in Path(self.folder).parts:
            raise ValueError(
                "CheckpointConfig.folder must be a relative path inside the run directory, "
                f"got {self.folder!r}"
            )


@dataclass(frozen=True)
class CheckpointEntry:
    """One committed checkpoint (a row of ``manifest.json``; fields in the module docstring)."""

    step: int
    path: str
    health: str
    time: float
    world_size: int
    data: Any = None
    note: str = ""


class CheckpointBackend(Protocol):
    """Writes and reads the framework state inside one checkpoint folder. `Checkpoints` keeps the
    manifest, ``thermo.json`` (data positions, thermo's state), health and retention; the backend
    only fills the folder. Every method is called on every rank, together.

    `save` gets an empty folder (created on rank 0 before a barrier). `load` changes the live
    objects in place; it must check what it can before changing anything. `torn` says why the
    folder cannot be loaded (missing or short files) or returns None; it runs on rank 0 only.
    """

    def save(self, path: Path, model: Any, optimizer: Any, scheduler: Any, rng: bool) -> None: ...

    def load(self, path: Path, model: Any, optimizer: Any, scheduler: Any, rng: bool) -> None: ...

    def torn(self, path: Path) -> str | None: ...


class DCPBackend:
    """The default backend: model, optimizer, scheduler and each rank's RNG through
    ``torch.distributed.checkpoint`` (plain, DDP, FSDP2, DDP + ZeroRedundancyOptimizer)."""

    def save(self, path: Path, model, optimizer, scheduler, rng: bool) -> None:
        import torch.distributed.checkpoint as dcp

        with _quiet():
            dcp.save(_dcp_state(model, optimizer, scheduler, rng=rng), checkpoint_id=path)

    def load(self, path: Path, model, optimizer, scheduler, rng: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
        if scheduler is not None and "scheduler" not in saved:
            raise ValueError(f"Checkpoints.restore: {path} holds no scheduler state; pass scheduler=None")
        if optimizer is not None and not any(k.startswith("optim.") for k in saved):
            raise ValueError(f"Checkpoints.restore: {path} holds no optimizer state; pass optimizer=None")
        rng_key = f"rank{_dist.rank()}"
        has_rng = rng and f"rng.{rng_key}" in saved
        if rng and not has_rng:
            warnings.warn(
                f"thermo: {path} has no RNG state for rank {_dist.rank()} (written by another "
                "number of ranks); this rank's RNG is left as it is",
                RuntimeWarning,
                stacklevel=3,
            )
        state = _dcp_state(model, optimizer, scheduler, rng=has_rng, groups="optim_groups" in saved)
        with _quiet():
            dcp.load(state, checkpoint_id=path)

        zero = _zero(optimizer)
        opt = zero.optim if zero is not None else optimizer
        if opt is None:
            set_model_state_dict(model, state["model"], options=_options())
        else:
            with _without_empty_groups(opt):
                set_state_dict(
                    model,
                    opt,
                    model_state_dict=state["model"],
                    optim_state_dict=state["optim"],
                    options=_options(),
                )
        if zero is not None:
            if "optim_groups" in state:
                for group, hyper in zip(zero.param_groups, pickle.loads(state["optim_groups"])):
                    group.update(hyper)
            else:  # a checkpoint of a plain optimizer: the local groups hold the loaded values
                _copy_hyper(zero.optim.param_groups, zero.param_groups)
            _copy_hyper(zero.param_groups, zero.optim.param_groups)
        if scheduler is not None:
            scheduler.load_state_dict(pickle.loads(state["scheduler"]))
        if has_rng:
            _set_rng(pickle.loads(state["rng"][rng_key]))

    def torn(self, path: Path) -> str | None:
        if not (path / ".metadata").is_file():
            return ".metadata is missing: the save did not finish or files were deleted"
        from torch.distributed.checkpoint import FileSystemReader

        try:
            storage = FileSystemReader(path).read_metadata().storage_data
        except Exception as e:  # noqa: BLE001 - any unreadable .metadata means the same thing here
            return f".metadata is unreadable ({type(e).__name__})"
        need: dict[str, int] = {}
        for info in storage.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for rel, size in need.items():
            f = path / rel
            if not f.is_file() or f.stat().st_size < size:
                return f"{rel} is missing or shorter than recorded"
        return None


class Checkpoints:
    """Save, judge and restore the run's checkpoints.

    `save`, `restore` and `newest_good` are collectives: every rank calls them together. `promote`
    and `mark_bad` may be called on every rank; only rank 0 acts.

    Args:
        run_dir: the run directory.
        config: a `CheckpointConfig`; keyword arguments override its fields.
        backend: what writes and reads a folder's framework state (default `DCPBackend`).

    Raises:
        RunDirError: ``manifest.json`` is corrupt or foreign, or missing while checkpoint folders
            exist (thermo will not guess their health; see `rebuild_manifest`). Nothing is deleted.

    Example:
        >>> ckpts = Checkpoints("runs/exp1", keep_last=3, good_after=50)
        >>> ckpts.save(step, model, optimizer, scheduler, data=sampler.state_dict(), extra=state)
        >>> ckpts.promote(healthy_through_step)
        >>> ckpts.mark_bad(verdict.onset)
        >>> entry = ckpts.newest_good(before_step=verdict.onset - margin)
        >>> out = ckpts.restore(entry, model, optimizer, scheduler)
        >>> sampler.load_state_dict(out["data"])
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: CheckpointConfig | None = None,
        *,
        backend: CheckpointBackend | None = None,
        **overrides: Any,
    ):
        self.run_dir = Path(run_dir)
        self.config = replace(config or CheckpointConfig(), **overrides)
        self.backend = backend if backend is not None else DCPBackend()
        self.dir = self.run_dir / self.config.folder
        self.manifest_path = self.run_dir / MANIFEST_NAME
        # Every rank reads (so every rank raises alike on a broken manifest); rank 0 writes.
        self._entries = self._read_manifest()
        if self._entries is None:
            self._entries = []
            if _dist.is_rank0():
                self._write_manifest()

    # -- manifest --------------------------------------------------------------------------

    @property
    def entries(self) -> list[CheckpointEntry]:
        """The committed checkpoints, oldest first (rank 0's view is the authoritative one)."""
        return list(self._entries)

    def _read_manifest(self) -> list[CheckpointEntry] | None:
        if not self.manifest_path.exists():
            folders = _step_folders(self.dir)
            if folders:
                raise RunDirError(
                    f"{self.manifest_path} is missing but {self.dir} holds {len(folders)} checkpoint "
                    f"folders ({folders[0].name} ...): thermo will not guess which are good. Restore "
                    "manifest.json, or list them again as pending with "
                    f"thermo.checkpoints.rebuild_manifest({str(self.run_dir)!r}), or move the folder away."
                )
            return None
        fix = "Restore it from a backup or fix it; the checkpoint folders were left untouched."
        return _parse_manifest(read_json(self.manifest_path, "checkpoint manifest", fix), self, fix)

    def _write_manifest(self) -> None:
        _write_manifest(self.manifest_path, self._entries)

    def _update(self, change) -> list[int]:
        """Apply `change(entry) -> new entry or None` on rank 0; write if anything changed."""
        if not _dist.is_rank0():
            return []
        changed, new = [], []
        for e in self._entries:
            e2 = change(e)
            if e2 is not None and e2 != e:
                changed.append(e.step)
                e = e2
            new.append(e)
        if changed:
            self._entries = new
            self._write_manifest()
        return changed

    def promote(self, step_healthy_through: int) -> list[int]:
        """Mark pending checkpoints good once `good_after` healthy steps followed them.

        Args:
            step_healthy_through: the last step the detector has cleared.

        Returns:
            The steps promoted (on rank 0; other ranks get []).
        """
        after = self.config.good_after
        return self._update(
            lambda e: replace(e, health="good")
            if e.health == "pending" and e.step + after <= step_healthy_through
            else None
        )

    def mark_bad(self, onset_step: int, note: str = "") -> list[int]:
        """Mark every checkpoint at or after `onset_step` bad: it was written while already sick.

        Returns:
            The steps newly marked bad (on rank 0; other ranks get []).
        """
        return self._bad_from(onset_step, note or f"written at or after the onset step {onset_step}")

    def _bad_from(self, first_step: int, note: str) -> list[int]:
        return self._update(
            lambda e: replace(e, health="bad", note=note)
            if e.step >= first_step and e.health != "bad"
            else None
        )

    def newest_good(self, before_step: int | None = None) -> CheckpointEntry | None:
        """The newest good checkpoint with ``step < before_step`` whose folder is intact.

        A torn or missing folder is skipped with a warning and the next older good one is used.
        Rank 0 decides; under torch.distributed every rank gets its answer (a collective).
        """
        found = None
        if _dist.is_rank0():
            for e in sorted(self._entries, key=lambda e: -e.step):
                if e.health != "good" or (before_step is not None and e.step >= before_step):
                    continue
                why = self.torn(e)
                if why is None:
                    found = e
                    break
                warnings.warn(
                    f"thermo: checkpoint {self.run_dir / e.path} is unusable ({why}); "
                    "falling back to an older good checkpoint",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if _dist.initialized():
            import torch.distributed as dist

            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        return found

    def torn(self, entry: CheckpointEntry) -> str | None:
        """Why `entry`'s folder cannot be loaded (missing, unfinished, short files), or None."""
        return _torn(self.run_dir / entry.path, self.backend)

    # -- save ------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        data: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> CheckpointEntry:
        """Write a checkpoint of `step` on every rank and commit it as pending. A collective.

        Args:
            step: the step whose optimizer update the state includes.
            model: plain, DDP or FSDP2 (``fully_shard``) module (what the backend takes).
            optimizer: a torch optimizer, or a ``ZeroRedundancyOptimizer`` (each rank saves the
                state of the parameters it owns, under their names).
            scheduler: an LR scheduler (anything with ``state_dict``/``load_state_dict``).
            data: this rank's data position, JSON-serialisable (e.g. the sampler state).
            extra: thermo's own state (thermometer, detector), JSON-serialisable; rank 0's is kept
                and every rank gets it back from `restore`.

        Returns:
            The committed entry. An older checkpoint of the same step (from before a rollback) is
            replaced. Retention then keeps the last `keep_last` that are not bad plus the newest
            good one, and deletes other folders, including strays without a manifest entry.

        Save after the first optimizer step: DCP's ``get_state_dict`` fills an optimizer that has
        no state yet with a zero-LR step, which for Adam advances the step count.
        """
        rank0 = _dist.is_rank0()
        err = _json_error(data, "data") or (_json_error(extra, "extra") if rank0 else None)
        gathered = _all_gather((data, err))
        errors = [e for _, e in gathered if e]
        if errors:
            raise ValueError(f"Checkpoints.save: {errors[0]}")
        name = f"step_{step:08d}"
        path = self.dir / name
        if rank0:
            # Drop the entry first: a crash between the two steps leaves a stray folder, never an
            # entry that points at a half-deleted one.
            if any(e.step == step for e in self._entries):
                self._entries = [e for e in self._entries if e.step != step]
                self._write_manifest()
            shutil.rmtree(path, ignore_errors=True)
            self.dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        self.backend.save(path, model, optimizer, scheduler, self.config.rng)
        entry = CheckpointEntry(
            step=step,
            path=f"{self.config.folder}/{name}",
            health="pending",
            time=time.time(),
            world_size=_dist.world_size(),
            data=gathered[0][0],
        )
        if rank0:
            atomic_write_json(
                path / STATE_NAME,
                {
                    "format": STATE_FORMAT,
                    "version": 1,
                    "step": step,
                    "world_size": entry.world_size,
                    "data": [d for d, _ in gathered],
                    "extra": extra,
                },
            )
        _barrier()  # every rank has finished writing: now the checkpoint may count
        if rank0:
            self._entries.append(entry)
            self._write_manifest()
            self._retain()
        return entry

    def _retain(self) -> None:
        live = sorted((e for e in self._entries if e.health != "bad"), key=lambda e: e.step)
        keep = {e.step for e in live[-self.config.keep_last :]}
        good = [e.step for e in self._entries if e.health == "good"]
        if good:
            keep.add(max(good))
        dropped = [e for e in self._entries if e.step not in keep]
        if dropped:
            self._entries = [e for e in self._entries if e.step in keep]
            self._write_manifest()  # commit first, then delete (see save)
        owned = {(self.run_dir / e.path).resolve() for e in self._entries}
        for folder in _step_folders(self.dir):
            if folder.resolve() not in owned:
                shutil.rmtree(folder, ignore_errors=True)

    # -- restore ---------------------------------------------------------------------------

    def restore(
        self,
        entry: CheckpointEntry,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
    ) -> dict[str, Any]:
        """Load `entry` into model, optimizer and scheduler, and this rank's RNG. A collective.

        Checkpoints after `entry` are marked bad ("superseded"): the run continues from here, so
        they belong to an abandoned timeline and must never be rolled back to.

        Returns:
            ``{"step": ..., "data": this rank's data position, "extra": rank 0's extra}``.
        """
        path = self.run_dir / entry.path
        fix = "Pick another checkpoint (Checkpoints.newest_good skips unusable ones)."
        meta = read_json(path / STATE_NAME, "checkpoint state", fix)
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise RunDirError(f"{path / STATE_NAME} is not a thermo checkpoint state. {fix}")
        data = _rank_data(meta.get("data") or [None], path)  # check before changing anything
        self.backend.load(path, model, optimizer, scheduler, self.config.rng)
        self._bad_from(entry.step + 1, f"superseded: the run was rolled back to step {entry.step}")
        return {"step": entry.step, "data": data, "extra": meta.get("extra")}


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
    _write_manifest(manifest, entries)
    return entries


def _dcp_state(model, optimizer, scheduler, rng: bool, groups: bool = True) -> dict:
    """The DCP state dict; for a load, a template of the right shapes that DCP fills in."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    zero = _zero(optimizer)
    if zero is not None:
        # The scheduler writes the LR into ZeRO's global groups; the local optimizer's only
        # catch up at its next step.
        _copy_hyper(zero.param_groups, zero.optim.param_groups)
        optimizer = zero.optim
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model, options=_options())}
    else:
        with _without_empty_groups(optimizer):
            msd, osd = get_state_dict(model, optimizer, options=_options())
        state = {"model": msd, "optim": osd}
    if zero is not None and groups:
        # Identical on every rank, and complete even for a rank that owns no parameter of a group.
        state["optim_groups"] = pickle.dumps(
            [{k: v for k, v in g.items() if k != "params"} for g in zero.param_groups]
        )
    if scheduler is not None:
        # One pickled blob: a scheduler's state dict is small and its layout varies by class.
        state["scheduler"] = pickle.dumps(scheduler.state_dict())
    if rng:
        state["rng"] = {f"rank{_dist.rank()}": pickle.dumps(_rng_state())}
    return state


# -- helpers ----------------------------------------------------------------------------------


@contextmanager
def _quiet():
    # DCP warns on every call without a process group that it "assumes" one process: it is right.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


@contextmanager
def _without_empty_groups(optimizer):
    """Hide param groups with no parameter from DCP's optimizer state dicts, which index each
    group's first parameter. ZeRO-1 leaves a rank without any parameter of a small group. The
    flattened state is keyed by parameter name, so the hidden groups lose nothing (their
    hyperparameters travel in ``optim_groups``)."""
    groups = optimizer.param_groups
    optimizer.param_groups = [g for g in groups if g["params"]]
    try:
        yield
    finally:
        # A load replaces the group dicts: keep the new ones, put the empty ones back in place.
        loaded = iter(optimizer.param_groups)
        optimizer.param_groups = [next(loaded) if g["params"] else g for g in groups]


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Optimizer state keyed by parameter name, one key per (param, state): the same layout for
    # every parallelism, and ZeRO ranks' disjoint shards never collide.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _zero(optimizer):
    # Not imported unless the user did: importing it scripts a dozen functional optimizers.
    zmod = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if optimizer is None or zmod is None or not isinstance(optimizer, zmod.ZeroRedundancyOptimizer):
        return None
    if getattr(optimizer, "_overlap_with_ddp", False):
        raise NotImplementedError(
            "Checkpoints: ZeroRedundancyOptimizer(overlap_with_ddp=True) is not supported; "
            "construct it with overlap_with_ddp=False"
        )
    return optimizer


def _copy_hyper(src: list[dict], dst: list[dict]) -> None:
    for s, d in zip(src, dst, strict=True):
        d.update({k: v for k, v in s.items() if k != "params"})


def _rng_state() -> dict[str, Any]:
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[torch.cuda.current_device() % len(cuda)])


def _rank_data(data: list[Any], path: Path) -> Any:
    if all(d == data[0] for d in data):  # e.g. ResumableSampler: the same position on every rank
        return data[0]
    if len(data) != _dist.world_size():
        raise ValueError(
            f"Checkpoints.restore: {path} holds a different data position per rank for "
            f"{len(data)} ranks; it cannot be restored on {_dist.world_size()} ranks (use a "
            "sampler whose position is the same on every rank, like thermo.data.ResumableSampler)"
        )
    return data[_dist.rank()]


def _json_error(obj: Any, what: str) -> str | None:
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError) as e:
        return f"{what} must be JSON-serialisable (dicts, lists, numbers, strings): {e}"
    return None


def _all_gather(obj: Any) -> list[Any]:
    if not _dist.initialized():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if _dist.initialized():
        import torch.distributed as dist

        dist.barrier()


def _write_manifest(path: Path, entries: list[CheckpointEntry]) -> None:
    atomic_write_json(
        path,
        {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
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
