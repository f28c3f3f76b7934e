"""What the model reads: the blacklist, a resumable sampler that skips it, and the batch ledger.

Everything here speaks in **sample ids** (an index into the dataset), never in iteration numbers:
iteration numbers shift as soon as anything is skipped, while a sample id names the same tokens
whatever the batch size, the number of ranks or the order of reading (see `thermo.corpus`).

============== ===================================================================================
piece          role
============== ===================================================================================
`Blacklist`    ``RUN/blacklist.json``: sample id -> why it is skipped (reason, verdict, time, who).
               Edited by the trainer, the supervisor and ``thermo blacklist`` at once, merged
               under a file lock so nobody loses an entry.
`ResumableSampler` global batches from a seeded per-epoch permutation, blacklisted ids left out;
               its state is a raw cursor, so a restored run reads exactly what a run that had the
               new blacklist from the start would have read.
`BatchLedger`  step -> the global batch's sample ids, to blacklist the batches around a divergence.
`StatefulLoader` the same skipping for any loader with ``state_dict``/``load_state_dict``
               (torchdata's StatefulDataLoader protocol), at whole-batch granularity.
============== ===================================================================================
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from thermo import _dist
from thermo._io import RunDirError, atomic_write_json, read_json

BLACKLIST_NAME = "blacklist.json"
BLACKLIST_LOCK = ".blacklist.lock"
BLACKLIST_FORMAT = "thermo.blacklist"
BLACKLIST_VERSION = 1
SOURCES = ("guard", "supervisor", "user")
SAMPLER_STATE_VERSION = 1


# -- blacklist --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlacklistEntry:
    """Why one sample id is skipped.

    Attributes:
        reason: free text ("loss spike at step 1412").
        verdict: the detector verdict that put it there, as a JSON dict (None for manual edits).
        time: when it was added (Unix seconds).
        source: who added it: ``"guard"``, ``"supervisor"`` or ``"user"``.
    """

    reason: str
    verdict: dict[str, Any] | None
    time: float
    source: str


def _verdict_json(verdict: Any) -> dict[str, Any] | None:
    if verdict is None:
        return None
    if dataclasses.is_dataclass(verdict) and not isinstance(verdict, type):
        verdict = dataclasses.asdict(verdict)
    elif hasattr(verdict, "to_dict"):
        verdict = verdict.to_dict()
    elif not isinstance(verdict, dict):
        verdict = {"repr": repr(verdict)}
    # Round trip so that what is kept in memory is exactly what the file will hold.
    return json.loads(json.dumps(verdict, default=str))


class Blacklist:
    """The run's skipped sample ids, in ``RUN/blacklist.json``.

    Bound to a run directory, every `add`/`remove` is one transaction: take the lock file
    ``RUN/.blacklist.lock`` (``fcntl.flock``), re-read the file, apply the change, write it
    atomically. The trainer, the supervisor and ``thermo blacklist`` may edit at the same time and
    nobody loses an entry. Without a run directory it is an in-memory set (tests, one-off use).

    File format (version 1)::

        {"format": "thermo.blacklist", "version": 1,
         "entries": [{"id": 17, "reason": "...", "verdict": {...} | null,
                      "time": 1764200000.0, "source": "guard"}, ...]}

    Args:
        run_dir: the run directory, or None for an in-memory blacklist.

    Example:
        >>> bl = Blacklist.load("runs/exp1")
        >>> bl.add([17, 18], reason="loss spike at step 1412", verdict=v, source="guard")
        >>> 17 in bl
        True
    """

    def __init__(self, run_dir: str | os.PathLike | None = None):
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._entries: dict[int, BlacklistEntry] = {}
        self._ids: frozenset[int] | None = None

    @property
    def path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / BLACKLIST_NAME

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Blacklist:
        """Read ``RUN/blacklist.json``; a missing file is an empty blacklist.

        Raises:
            RunDirError: the file is not valid JSON, not a thermo blacklist, or from a newer thermo.
        """
        bl = cls(run_dir)
        bl.reload()
        return bl

    def reload(self) -> None:
        """Re-read the file (picks up edits by the supervisor or ``thermo blacklist``)."""
        if self.run_dir is not None:
            self._set(self._read())

    # -- queries ---------------------------------------------------------------------------

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._entries))

    @property
    def ids(self) -> frozenset[int]:
        if self._ids is None:
            self._ids = frozenset(self._entries)
        return self._ids

    @property
    def entries(self) -> dict[int, BlacklistEntry]:
        return dict(self._entries)

    # -- edits -----------------------------------------------------------------------------

    def add(
        self,
        ids: Iterable[int],
        reason: str,
        verdict: Any = None,
        source: str = "user",
    ) -> list[int]:
        """Skip these sample ids from now on (and persist at once when bound to a run directory).

        Args:
            ids: sample ids (ints >= 0).
            reason: why, in words.
            verdict: the detector verdict (a dataclass or dict; stored as JSON) or None.
            source: ``"guard"``, ``"supervisor"`` or ``"user"``.

        Returns:
            The ids that were not blacklisted before, sorted. Ids already there keep their
            first reason.
        """
        if source not in SOURCES:
            raise ValueError(f"Blacklist.add: source must be one of {SOURCES}, got {source!r}")
        ids = sorted({_sample_id(i) for i in ids})
        entry = BlacklistEntry(str(reason), _verdict_json(verdict), time.time(), source)
        added: list[int] = []

        def apply(entries: dict[int, BlacklistEntry]) -> None:
            for i in ids:
                if i not in entries:
                    entries[i] = entry
                    added.append(i)

        self._transaction(apply)
        return added

    def remove(self, ids: Iterable[int]) -> list[int]:
        """Serve these sample ids again. Returns the ids that were blacklisted, sorted."""
        ids = sorted({_sample_id(i) for i in ids})
        removed: list[int] = []

        def apply(entries: dict[int, BlacklistEntry]) -> None:
            for i in ids:
                if entries.pop(i, None) is not None:
                    removed.append(i)

        self._transaction(apply)
        return removed

    def save(self) -> None:
        """Merge this object's entries into the file (the file's other entries are kept)."""
        if self.run_dir is None:
            raise ValueError("Blacklist.save: this blacklist has no run directory; use Blacklist(run_dir)")
        mine = dict(self._entries)
        self._transaction(lambda entries: entries.update(mine))

    # -- file ------------------------------------------------------------------------------

    def _transaction(self, apply: Callable[[dict[int, BlacklistEntry]], None]) -> None:
        if self.run_dir is None:
            entries = dict(self._entries)
            apply(entries)
            self._set(entries)
            return
        with _locked(self.run_dir / BLACKLIST_LOCK):
            # Re-read under the lock: another process may have added entries since our last read.
            entries = self._read()
            apply(entries)
            atomic_write_json(self.path, _to_json(entries))
        self._set(entries)

    def _set(self, entries: dict[int, BlacklistEntry]) -> None:
        self._entries = entries
        self._ids = None

    def _read(self) -> dict[int, BlacklistEntry]:
        assert self.path is not None
        if not self.path.exists():
            return {}
        fix = (
            "Repair it (see the format in thermo.data.Blacklist), or move it away to start with an "
            "empty blacklist."
        )
        obj = read_json(self.path, "blacklist", fix)
        return _from_json(obj, self.path, fix)


def _sample_id(i: Any) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
        raise ValueError(f"sample ids are ints >= 0, got {i!r}")
    return int(i)


def _to_json(entries: dict[int, BlacklistEntry]) -> dict[str, Any]:
    return {
        "format": BLACKLIST_FORMAT,
        "version": BLACKLIST_VERSION,
        "entries": [{"id": i, **dataclasses.asdict(entries[i])} for i in sorted(entries)],
    }


def _from_json(obj: Any, path: Path, fix: str) -> dict[int, BlacklistEntry]:
    if not isinstance(obj, dict) or obj.get("format") != BLACKLIST_FORMAT:
        raise RunDirError(f'{path} is not a thermo blacklist (no "format": "{BLACKLIST_FORMAT}"). {fix}')
    version = obj.get("version")
    if not isinstance(version, int) or version > BLACKLIST_VERSION:
        raise RunDirError(
            f"{path} has blacklist format version {version!r}; this thermo reads up to "
            f"{BLACKLIST_VERSION}. Upgrade thermo to read it."
        )
    rows = obj.get("entries")
    if not isinstance(rows, list):
        raise RunDirError(f'{path}: "entries" must be a list. {fix}')
    entries: dict[int, BlacklistEntry] = {}
    for n, row in enumerate(rows):
        try:
            i = _sample_id(row["id"])
            verdict = row.get("verdict")
            if verdict is not None and not isinstance(verdict, dict):
                raise ValueError("verdict must be an object or null")
            if row.get("source", "user") not in SOURCES:
                raise ValueError(f"source must be one of {SOURCES}")
            entries[i] = BlacklistEntry(
                str(row.get("reason", "")), verdict, float(row.get("time", 0.0)), row.get("source", "user")
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RunDirError(f"{path}: entry {n} is malformed ({e!r}). {fix}") from None
    return entries


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the fd closes, even if the process dies
        yield
    finally:
        os.close(fd)


def _as_blacklist(blacklist: Blacklist | Iterable[int] | None) -> Blacklist:
    if isinstance(blacklist, Blacklist):
        return blacklist
    bl = Blacklist()
    if blacklist is not None:
        bl.add(blacklist, reason="given to the sampler")
    return bl


# -- sampler ----------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    # Not seed + epoch (DistributedSampler's choice): that makes (seed=1, epoch=0) and
    # (seed=0, epoch=1) the same permutation.
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


class ResumableSampler:
    """Global batches of sample ids, deterministic per (seed, epoch), blacklisted ids skipped.

    Each epoch is a fixed permutation of ``range(num_samples)`` (a ``torch.Generator`` seeded from
    (seed, epoch); the global RNG is never touched). A global batch is formed by walking that
    permutation from a **raw cursor** and taking the next `global_batch_size` ids that are not
    blacklisted; every rank takes its contiguous slice (`local`). The global batches do not depend
    on the number of ranks.

    Epoch end (drop_last): a batch never spans two epochs. When the rest of an epoch holds fewer
    than `global_batch_size` ids that are not blacklisted, that remainder is dropped and the next
    batch starts at position 0 of the next epoch's permutation. Epochs roll over forever;
    `__iter__` never ends (stop by step count).

    The equality property (what a rollback relies on): the state is (epoch, cursor), a position in
    the raw permutation, not a count of batches. Restore a state, blacklist more ids that all lie
    after that position, and the stream from there on is exactly the stream of a run that had
    those ids blacklisted from the start, batch for batch. The condition matters when the
    blacklisted batches cross an epoch end: an id read in the next epoch was also read earlier in
    the restored one, perhaps before the restored position, where the never-saw-it run would
    have skipped it. Such an id is skipped from the restored position on; the batches before it
    cannot change.

    Args:
        data: the dataset (anything with ``len``) or its number of samples.
        global_batch_size: sample ids per global batch (all ranks together).
        seed: seeds the per-epoch permutations.
        shuffle: False walks ``0..N-1`` in order every epoch.
        blacklist: a `Blacklist` (consulted live, so ids added later are skipped from the next
            batch on), an iterable of ids, or None.
        rank, world_size: this rank's slice; None reads them from torch.distributed at each call.

    Example:
        >>> sampler = ResumableSampler(dataset, 64, seed=0, blacklist=Blacklist.load(run))
        >>> ids = sampler.next_global_batch()              # the 64 ids of this step, all ranks
        >>> x, y = dataset.batch(sampler.local(ids))       # this rank's 64 / world_size
        >>> loader = DataLoader(dataset, batch_sampler=sampler)   # or as a batch_sampler
    """

    def __init__(
        self,
        data: int | Sized,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        blacklist: Blacklist | Iterable[int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        n = data if isinstance(data, int) else len(data)
        if n < 1:
            raise ValueError(f"ResumableSampler: the dataset is empty (num_samples={n})")
        if global_batch_size < 1:
            raise ValueError(f"ResumableSampler.global_batch_size must be >= 1, got {global_batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("ResumableSampler: give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler.rank must be in [0, {world_size}), got {rank}")
        self.num_samples = n
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.blacklist = _as_blacklist(blacklist)
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.cursor = 0  # position in the raw permutation of `epoch`
        self.served = 0  # global batches handed out so far (informational)
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return _dist.rank() if self._rank is None else self._rank

    @property
    def world_size(self) -> int:
        return _dist.world_size() if self._world is None else self._world

    def set_blacklist(self, blacklist: Blacklist | Iterable[int] | None) -> None:
        """Skip these ids from the next batch on (a `Blacklist` is consulted live)."""
        self.blacklist = _as_blacklist(blacklist)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The raw order of `epoch` (int64, every sample id once, blacklisted ones included)."""
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                perm = torch.randperm(self.num_samples, generator=g)
            else:
                perm = torch.arange(self.num_samples)
            self._perm = (epoch, perm)
        return self._perm[1]

    def _take(self, epoch: int, cursor: int) -> tuple[list[int], int, int]:
        """The global batch at (epoch, cursor) and the position after it; pure."""
        size, bl = self.global_batch_size, self.blacklist
        while True:
            perm = self.permutation(epoch)
            n, whole_epoch = len(perm), cursor == 0
            batch: list[int] = []
            while cursor < n and len(batch) < size:
                chunk = perm[cursor : cursor + 2 * size].tolist()
                for k, i in enumerate(chunk):
                    if i not in bl:
                        batch.append(i)
                        if len(batch) == size:
                            cursor += k + 1
                            break
                else:
                    cursor += len(chunk)
            if len(batch) == size:
                return batch, epoch, cursor
            if whole_epoch:  # every epoch holds the same ids: none will ever fill a batch
                raise ValueError(
                    f"ResumableSampler: fewer than global_batch_size={size} of the "
                    f"{self.num_samples} samples are not blacklisted; nothing left to train on"
                )
            epoch, cursor = epoch + 1, 0  # drop_last: the short remainder of the epoch is skipped

    def next_global_batch(self) -> list[int]:
        """The next global batch of sample ids (all ranks); advances the position."""
        batch, self.epoch, self.cursor = self._take(self.epoch, self.cursor)
        self.served += 1
        return batch

    def peek(self, n: int) -> list[list[int]]:
        """The next `n` global batches without advancing (to blacklist batches past a detection)."""
        out, epoch, cursor = [], self.epoch, self.cursor
        for _ in range(n):
            batch, epoch, cursor = self._take(epoch, cursor)
            out.append(batch)
        return out

    def local(self, batch: list[int]) -> list[int]:
        """This rank's contiguous slice of a global batch."""
        world, rank = self.world_size, self.rank
        if len(batch) % world:
            raise ValueError(
                f"ResumableSampler: a global batch of {len(batch)} does not split over {world} ranks; "
                "make global_batch_size a multiple of the world size"
            )
        k = len(batch) // world
        return batch[rank * k : (rank + 1) * k]

    def __iter__(self) -> Iterator[list[int]]:
        """Local batches forever (usable as a DataLoader ``batch_sampler``).

        With DataLoader workers the loader fetches ahead, so `state_dict` is then ahead of what
        the loop consumed; use ``num_workers=0`` or call `next_global_batch` from the loop.
        """
        while True:
            yield self.local(self.next_global_batch())

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-serialisable: feed it to `load_state_dict` (or a checkpoint)."""
        return {
            "version": SAMPLER_STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "served": self.served,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position. The global batch size may differ (the cursor counts
        samples, not batches); the dataset size, seed and shuffle must match."""
        if not isinstance(state, dict) or state.get("version") != SAMPLER_STATE_VERSION:
            raise ValueError(
                f"ResumableSampler.load_state_dict: not a sampler state of version "
                f"{SAMPLER_STATE_VERSION}: {state!r:.200}"
            )
        for key in ("seed", "shuffle", "num_samples"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"ResumableSampler.load_state_dict: the state was saved with {key}="
                    f"{state.get(key)!r}, this sampler has {key}={getattr(self, key)!r}; the "
                    "permutations would differ"
                )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.num_samples:
            raise ValueError(f"ResumableSampler.load_state_dict: bad position epoch={epoch} cursor={cursor}")
        self.epoch, self.cursor, self.served = epoch, cursor, int(state.get("served", 0))


# -- batch ledger -----------------------------------------------------------------------------


class BatchLedger:
    """Which sample ids each step trained on (the global batch), for the recent steps.

    The Guard records every step, persists new rows with ``Store.write_ledger`` at each flush
    (`pop_unwritten`), and on a verdict asks for the ids of steps [onset - a, detection]
    (`ids_for`; the batches after the detection come from `ResumableSampler.peek`).

    Args:
        max_steps: steps kept in memory (oldest dropped first; rows not yet popped by
            `pop_unwritten` are kept until they are).

    Example:
        >>> ledger.record(step, ids)
        >>> store.write_ledger(attempt, ledger.pop_unwritten())    # at flush
        >>> bad = ledger.ids_for(onset - 20, detection)
        >>> ledger.rewind(checkpoint_step)                          # after a rollback
    """

    def __init__(self, max_steps: int = 10_000):
        if max_steps < 1:
            raise ValueError(f"BatchLedger.max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        # step -> ids; int64 arrays: a Python list of ints costs ~4x the memory
        self._rows: dict[int, np.ndarray] = {}
        self._unwritten: dict[int, np.ndarray] = {}

    def record(self, step: int, ids: Iterable[int]) -> None:
        """Record the global batch of `step` (a step recorded again, after a rewind, is replaced)."""
        arr = np.fromiter((int(i) for i in ids), dtype=np.int64)
        self._rows.pop(step, None)  # re-insert at the end: dicts keep insertion order
        self._rows[step] = arr
        self._unwritten[step] = arr
        while len(self._rows) > self.max_steps:
            del self._rows[next(iter(self._rows))]

    def __contains__(self, step: object) -> bool:
        return step in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def batches(self, first_step: int, last_step: int) -> dict[int, list[int]]:
        """step -> ids for the recorded steps in [first_step, last_step], in step order."""
        return {s: self._rows[s].tolist() for s in sorted(self._rows) if first_step <= s <= last_step}

    def ids_for(self, first_step: int, last_step: int) -> list[int]:
        """The distinct sample ids of the recorded steps in [first_step, last_step], sorted.

        Steps never recorded (before the run, or dropped past `max_steps`) contribute nothing;
        check with ``step in ledger`` or fall back to ``Store.ledger``.
        """
        rows = [a for s, a in self._rows.items() if first_step <= s <= last_step]
        return np.unique(np.concatenate(rows)).tolist() if rows else []

    def pop_unwritten(self) -> list[tuple[int, list[int]]]:
        """(step, ids) rows recorded since the last call, in step order, for ``Store.write_ledger``."""
        rows = [(s, self._unwritten[s].tolist()) for s in sorted(self._unwritten)]
        self._unwritten.clear()
        return rows

    def rewind(self, step: int) -> None:
        """Forget the steps after `step` (a rollback to a checkpoint taken at `step`: they are redone)."""
        for d in (self._rows, self._unwritten):
            for s in [s for s in d if s > step]:
                del d[s]


# -- wrapper for stateful loaders -------------------------------------------------------------


class StatefulLoaderProtocol(Protocol):
    """torchdata's StatefulDataLoader protocol: iterable, with a resumable position."""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StatefulLoader:
    """Skip the batches of any stateful loader that contain a blacklisted sample id.

    What it guarantees: no batch holding a blacklisted id is ever yielded, and after
    ``load_state_dict`` the stream is exactly the stream of a run that used this wrapper with the
    same blacklist from the start. What it cannot do: re-form batches. A whole batch is dropped
    (innocent samples in it included) and the batches around it keep their boundaries, so the
    stream is *not* the one a run that never saw those samples would read. Exact equality with
    such a run holds for `ResumableSampler`, which forms the batches itself.

    Under several ranks every rank must drop the same steps, or the ranks fall out of step and
    hang in a collective: either make `ids_fn` return the ids of the global batch (every rank
    decides alike), or pass ``sync=True`` to OR the decision over ranks (one tiny all_reduce per
    batch, a host sync on the data path).

    Args:
        loader: iterable with ``state_dict``/``load_state_dict`` (e.g. torchdata's
            StatefulDataLoader).
        ids_fn: batch -> the sample ids it holds (list or CPU tensor).
        blacklist: a `Blacklist` (consulted live), an iterable of ids, or None.
        sync: reduce the skip decision over the default process group.

    Example:
        >>> loader = StatefulLoader(StatefulDataLoader(ds, batch_size=8), ids_fn=lambda b: b["id"],
        ...                         blacklist=Blacklist.load(run))
        >>> for batch in loader: ...
    """

    def __init__(
        self,
        loader: StatefulLoaderProtocol,
        ids_fn: Callable[[Any], Iterable[int]],
        blacklist: Blacklist | Iterable[int] | None = None,
        *,
        sync: bool = False,
    ):
        for name in ("state_dict", "load_state_dict"):
            if not callable(getattr(loader, name, None)):
                raise TypeError(
                    f"StatefulLoader: {type(loader).__name__} has no {name}(); wrap a loader with a "
                    "resumable position (e.g. torchdata.stateful_dataloader.StatefulDataLoader) or "
                    "use ResumableSampler"
                )
        self.loader = loader
        self.ids_fn = ids_fn
        self.blacklist = _as_blacklist(blacklist)
        self.sync = sync
        self.skipped = 0  # batches dropped so far

    def set_blacklist(self, blacklist: Blacklist | Iterable[int] | None) -> None:
        self.blacklist = _as_blacklist(blacklist)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            ids = self.ids_fn(batch)
            if isinstance(ids, torch.Tensor):
                ids = ids.tolist()  # note: a host sync if the ids live on an accelerator
            skip = any(int(i) in self.blacklist for i in ids)
            if self.sync:
                skip = _any_rank(skip)
            if skip:
                self.skipped += 1
                continue
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "loader": self.loader.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "loader" not in state:
            raise ValueError(f"StatefulLoader.load_state_dict: not a StatefulLoader state: {state!r:.200}")
        self.loader.load_state_dict(state["loader"])
        self.skipped = int(state.get("skipped", 0))


def _any_rank(flag: bool) -> bool:
    if not _dist.initialized() or _dist.world_size() == 1:
        return flag
    import torch.distributed as dist

    device = "cpu"
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())  # note: a host sync (this is the data path, before the step)
