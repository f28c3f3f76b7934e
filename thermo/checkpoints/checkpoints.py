"""`Checkpoints`: save, judge (health, retention) and restore the run's checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from thermo import _dist
from thermo._io import RunDirError, atomic_write_json, read_json
from thermo.checkpoints.backends import CheckpointBackend, DCPBackend, backend_name
from thermo.checkpoints.config import CheckpointConfig
from thermo.rundir import RunDir
from thermo.checkpoints.manifest import (
    STATE_FORMAT,
    STATE_NAME,
    CheckpointEntry,
    _checksum,
    _file_list,
    _parse_manifest,
    _step_folders,
    _torn,
    _write_manifest,
)


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
        self.dir = RunDir(run_dir).checkpoints_dir(self.config.folder)
        self.manifest_path = RunDir(run_dir).manifest
        self._warned_budget = False
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
        obj = read_json(self.manifest_path, "checkpoint manifest", fix)
        entries = _parse_manifest(obj, self, fix)
        written_by, mine = obj.get("backend"), backend_name(self.backend)  # None: before the field
        if entries and written_by is not None and written_by != mine:
            raise RunDirError(
                f"{self.manifest_path} lists checkpoints written by the {written_by!r} backend, and this "
                f"process saves and loads {mine!r} ones: give this run its own run directory, or "
                f"continue it with the loop that wrote it"
            )
        return entries

    def _write_manifest(self) -> None:
        _write_manifest(self.manifest_path, self._entries, backend_name(self.backend))

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
        return _dist.from_rank0(found)

    def torn(self, entry: CheckpointEntry) -> str | None:
        """Why `entry`'s folder cannot be loaded (missing, unfinished, short or changed files, a
        symlink in its place, an empty ``thermo.json``), or None. Reads every file once per
        process to check the checksums the manifest holds; never unpickles anything."""
        return _torn(self.run_dir / entry.path, self.backend, entry.files)

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
        gathered = _dist.gather((data, err))
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
            if path.is_symlink():  # planted: never write through it (it could point anywhere)
                warnings.warn(f"thermo: {path} is a symlink, which thermo never writes; removed the "
                              "link (not what it points to) and saving a real folder", RuntimeWarning,
                              stacklevel=2)
                path.unlink()
            shutil.rmtree(path, ignore_errors=True)
            self.dir.mkdir(parents=True, exist_ok=True)
        _dist.barrier()
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
        _dist.barrier()  # every rank has finished writing
        # Checksums, the files shared out over the ranks (each reads back a share of what was
        # just written, mostly from the page cache); then the checkpoint may count.
        files = _file_list(path) if rank0 else None
        files = _dist.from_rank0(files)
        mine = {rel: _checksum(path, rel) for i, rel in enumerate(files) if i % _dist.world_size() == _dist.rank()}
        sums: dict[str, list] = {}
        for part in _dist.gather(mine):
            sums.update(part)
        entry = replace(entry, files={rel: sums[rel] for rel in files})
        if rank0:
            self._entries.append(entry)
            self._write_manifest()
            self._retain()
        return entry

    def _retain(self) -> None:
        keep = self._keep()
        dropped = [e for e in self._entries if e.step not in keep]
        if dropped:
            self._entries = [e for e in self._entries if e.step in keep]
            self._write_manifest()  # commit first, then delete (see save)
        owned = {os.path.normpath(self.run_dir / e.path) for e in self._entries}
        for folder in _step_folders(self.dir):
            if os.path.normpath(folder) in owned and not folder.is_symlink():
                continue
            if folder.is_symlink():
                folder.unlink()  # a planted link: remove it, never what it points to
            else:
                shutil.rmtree(folder, ignore_errors=True)

    def _keep(self) -> set[int]:
        """The steps retention keeps; at most ``keep_last + keep_between + 3`` of them, and within
        `max_bytes` if set (the newest, the newest good one, the next pending one and the one from
        before the look-back are kept whatever it says):

        - the newest `keep_last` that are not bad (the newest is what a crash resumes from);
        - the newest good one, and the oldest pending one after it (the next to become good:
          with checkpoints closer together than `good_after`, the others would all be deleted
          before any became good);
        - with a `horizon`: the newest good one older than ``newest - horizon`` (every onset a
          future verdict can report lies after that edge, so this one serves all of them; the
          oldest good one while none is that old), and up to `keep_between` good ones inside
          the window, spread evenly (a rollback whose onset lies in the window redoes fewer
          steps).
        """
        cfg = self.config
        live = sorted(e.step for e in self._entries if e.health != "bad")
        good = sorted(e.step for e in self._entries if e.health == "good")
        pending = [e.step for e in self._entries if e.health == "pending" and (not good or e.step > good[-1])]
        # What a rollback or a restart needs whatever happens next, then the rest in the order a
        # disk budget gives them up (first given up first).
        needed = {live[-1]} if live else set()
        optional: list[int] = []
        if good:
            needed.add(good[-1])
            if cfg.horizon and live:
                edge = live[-1] - cfg.horizon
                older = [s for s in good if s < edge]
                needed.add(older[-1] if older else good[0])
                inside = [s for s in good if s >= edge]
                for k in range(1, cfg.keep_between + 1):
                    mark = edge + k * cfg.horizon / (cfg.keep_between + 1)
                    below = [s for s in inside if s <= mark]
                    if below:
                        optional.append(below[-1])
        optional += live[-cfg.keep_last:-1]
        if pending:
            needed.add(min(pending))  # without it, under a tight budget nothing would ever become good
        keep = set(needed)
        if not cfg.max_bytes:
            return keep | set(optional)
        sizes = {e.step: _size(self.run_dir / e.path, e) for e in self._entries}
        total = sum(sizes[s] for s in keep)
        for step in reversed(list(dict.fromkeys(optional))):  # the most useful first
            if step not in keep and total + sizes[step] <= cfg.max_bytes:
                keep.add(step)
                total += sizes[step]
        if total > cfg.max_bytes and not self._warned_budget:
            self._warned_budget = True
            warnings.warn(f"thermo: the {len(needed)} checkpoints a rollback or a restart needs take {total / 1e6:.0f} MB, "
                          f"over CheckpointConfig.max_bytes ({cfg.max_bytes / 1e6:.0f} MB); kept anyway: raise "
                          "max_bytes or free disk", RuntimeWarning, stacklevel=4)
        return keep

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
        why = _dist.from_rank0(self.torn(entry) if _dist.is_rank0() else None)  # every rank raises alike
        if why is not None:
            raise RunDirError(f"checkpoint {path} is unusable: {why}. {fix}")
        meta = read_json(path / STATE_NAME, "checkpoint state", fix)
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise RunDirError(f"{path / STATE_NAME} is not a thermo checkpoint state. {fix}")
        data = _rank_data(meta.get("data") or [None], path)  # check before changing anything
        self.backend.load(path, model, optimizer, scheduler, self.config.rng)
        self._bad_from(entry.step + 1, f"superseded: the run was rolled back to step {entry.step}")
        return {"step": entry.step, "data": data, "extra": meta.get("extra")}


# -- helpers ----------------------------------------------------------------------------------


def _size(folder: Path, entry: CheckpointEntry) -> int:
    """Bytes a checkpoint takes: the manifest's record of its files, else what is on disk."""
    if entry.files is not None:
        return sum(size for size, _ in entry.files.values())
    try:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:
        return 0


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
