"""`Blacklist`: the run's skipped sample ids in ``RUN/blacklist.json``, edited under a file lock."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thermo._io import RunDirError, atomic_write_json, read_json

BLACKLIST_NAME = "blacklist.json"
BLACKLIST_LOCK = ".blacklist.lock"
BLACKLIST_FORMAT = "thermo.blacklist"
BLACKLIST_VERSION = 1
SOURCES = ("guard", "supervisor", "user")


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
