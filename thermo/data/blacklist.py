"""`Blacklist`: the run's skipped sample ids in ``RUN/blacklist.json``, edited under a file lock;
`IdSet`: a set of sample ids kept as sorted ranges."""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thermo._io import RunDirError, atomic_write_json, read_json
from thermo.rundir import RunDir

BLACKLIST_FORMAT = "thermo.blacklist"
BLACKLIST_VERSION = 2
SOURCES = ("guard", "supervisor", "user")
MAX_ID = 2**62  # sample ids are ints in [0, MAX_ID): a range's end + 1 stays in int64
# A group with more ranges than this is stored packed (zlib + base64 of the delta-encoded
# ranges) instead of as a readable JSON list.
_READABLE_RANGES = 10_000
# Up to this many ids, membership is also kept as a frozenset (the sampler asks per id).
_SET_CACHE = 200_000


@dataclass(frozen=True)
class BlacklistEntry:
    """Why sample ids are skipped.

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


class IdSet(Set):
    """An immutable set of sample ids stored as sorted, disjoint, non-adjacent inclusive ranges
    (two int64 arrays): ``0-100000000000`` costs two numbers, and set algebra between IdSets
    is vectorised. Iterates in increasing order; `len`, `in`, ``sorted(...)``, ``==`` and the
    set operators work as for a frozenset.

    Example:
        >>> s = IdSet.from_ranges([(0, 10**11)]) | IdSet.from_ids([5, 10**12])
        >>> len(s), 17 in s, s.ranges()[-1]
        (100000000002, True, (1000000000000, 1000000000000))
    """

    __slots__ = ("_s", "_e", "_set")

    def __init__(self, starts: np.ndarray | None = None, ends: np.ndarray | None = None):
        # Callers pass normalised arrays (see `_normalise`); the public constructors check input.
        self._s = np.zeros(0, np.int64) if starts is None else starts
        self._e = np.zeros(0, np.int64) if ends is None else ends
        self._set: frozenset[int] | None = None

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_ids(cls, ids: Iterable[Any]) -> IdSet:
        """From sample ids (ints in ``[0, 2**62)``, any order, repeats allowed).

        Raises:
            ValueError: an id that is not such an int (bools and floats included)."""
        if isinstance(ids, IdSet):
            return ids
        if isinstance(ids, (set, frozenset, range)) or not hasattr(ids, "__len__"):
            ids = list(ids)
        arr = np.asarray(ids)
        if arr.size == 0:
            return cls()
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            for i in np.ravel(arr).tolist() if arr.dtype != object else list(ids):
                _sample_id(i)  # names the first bad one
            raise ValueError(f"sample ids are ints >= 0, got an array of {arr.dtype}")
        if arr.dtype.kind == "u" and arr.max() >= MAX_ID or arr.dtype.kind == "i" and (
                arr.min() < 0 or arr.max() >= MAX_ID):
            bad = arr[(arr < 0) | (arr >= MAX_ID)][0] if arr.dtype.kind == "i" else arr.max()
            _sample_id(int(bad))
        arr = np.sort(arr.astype(np.int64))  # (np.unique's hash table is slower here)
        arr = arr[np.r_[True, arr[1:] != arr[:-1]]]
        breaks = np.flatnonzero(np.diff(arr) != 1)
        starts = np.concatenate([arr[:1], arr[breaks + 1]])
        ends = np.concatenate([arr[breaks], arr[-1:]])
        return cls(starts, ends)

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int]]) -> IdSet:
        """From inclusive (first, last) ranges, any order, overlaps allowed."""
        pairs = [(_sample_id(a), _sample_id(b)) for a, b in ranges]
        for a, b in pairs:
            if b < a:
                raise ValueError(f"a range of sample ids ends before it starts: {a}-{b}")
        if not pairs:
            return cls()
        arr = np.asarray(pairs, dtype=np.int64)
        return cls(*_normalise(arr[:, 0], arr[:, 1]))

    @classmethod
    def _from_iterable(cls, it: Iterable[Any]) -> IdSet:  # what the Set mixin methods build
        return cls.from_ids(list(it))

    # -- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return int((self._e - self._s + 1).sum())

    def __contains__(self, i: object) -> bool:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            return False
        if self._set is None and len(self._s) and len(self) <= _SET_CACHE:
            self._set = frozenset(self.to_array().tolist())
        if self._set is not None:
            return i in self._set
        if not len(self._s) or not 0 <= i < MAX_ID:
            return False
        k = int(np.searchsorted(self._s, i, side="right")) - 1
        return k >= 0 and i <= int(self._e[k])

    def __iter__(self) -> Iterator[int]:
        if len(self) <= 10 * _SET_CACHE:
            return iter(self.to_array().tolist())
        return (i for a, b in zip(self._s.tolist(), self._e.tolist()) for i in range(a, b + 1))

    def to_array(self) -> np.ndarray:
        """Every id, increasing, as int64 (as big as the set: mind ranges)."""
        lengths = self._e - self._s + 1
        offsets = np.cumsum(lengths) - lengths  # where each range begins in the output
        return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(self._s - offsets, lengths)

    def ranges(self) -> list[tuple[int, int]]:
        """The inclusive (first, last) ranges, in order."""
        return list(zip(self._s.tolist(), self._e.tolist()))

    def __repr__(self) -> str:
        shown = " ".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ranges()[:8])
        more = " ..." if len(self._s) > 8 else ""
        return f"IdSet({len(self)} ids: {shown}{more})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IdSet):
            return np.array_equal(self._s, other._s) and np.array_equal(self._e, other._e)
        return Set.__eq__(self, other)

    def __hash__(self) -> int:
        return hash((self._s.tobytes(), self._e.tobytes()))

    def __reduce__(self):
        return (IdSet, (self._s, self._e))

    # -- algebra -------------------------------------------------------------------------

    def _combine(self, other: Iterable[Any], keep: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> IdSet:
        o = other if isinstance(other, IdSet) else IdSet.from_ids(other)
        if not len(o._s) and keep(np.array([True]), np.array([False]))[0]:
            return self  # a | {}, a - {}, a ^ {}
        if not len(self._s) and keep(np.array([False]), np.array([True]))[0]:
            return o  # {} | b, {} ^ b
        if keep is _minus and len(self._s) <= 64 and len(self) <= _SET_CACHE:
            # A few ids against many ranges (one batch against a long blacklist): look them up.
            arr = self.to_array()
            return IdSet.from_ids(arr[~o._contains_many(arr)])
        return IdSet(*_sweep(self, o, keep))

    def _contains_many(self, arr: np.ndarray) -> np.ndarray:
        k = np.searchsorted(self._s, arr, side="right") - 1
        return (k >= 0) & (arr <= self._e[np.maximum(k, 0)]) if len(self._s) else np.zeros(len(arr), bool)

    def __or__(self, other):
        return self._combine(other, np.logical_or) if isinstance(other, Iterable) else NotImplemented

    __ror__ = __or__

    def __and__(self, other):
        return self._combine(other, np.logical_and) if isinstance(other, Iterable) else NotImplemented

    __rand__ = __and__

    def __sub__(self, other):
        return self._combine(other, _minus) if isinstance(other, Iterable) else NotImplemented

    def __rsub__(self, other):
        return IdSet.from_ids(other) - self if isinstance(other, Iterable) else NotImplemented

    def __xor__(self, other):
        return self._combine(other, np.logical_xor) if isinstance(other, Iterable) else NotImplemented

    __rxor__ = __xor__

    def union(self, *others: Iterable[Any]) -> IdSet:
        out = self
        for o in others:
            out = out | o
        return out

    def difference(self, *others: Iterable[Any]) -> IdSet:
        out = self
        for o in others:
            out = out - o
        return out


def _minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a & ~b


def _normalise(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint, non-adjacent ranges covering the same ids."""
    empty = IdSet()
    tmp = IdSet.__new__(IdSet)
    tmp._s, tmp._e, tmp._set = starts.astype(np.int64), ends.astype(np.int64), None
    return _sweep(tmp, empty, lambda a, b: a)


def _sweep(a: IdSet, b: IdSet, keep) -> tuple[np.ndarray, np.ndarray]:
    """Ranges where ``keep(covered by a, covered by b)`` holds: a sweep over every range's
    start and end + 1, counting how many ranges of each side cover each segment between them."""
    pts = np.concatenate([a._s, a._e + 1, b._s, b._e + 1])
    if not len(pts):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    na, nb = len(a._s), len(b._s)
    da = np.concatenate([np.ones(na, np.int64), -np.ones(na, np.int64), np.zeros(2 * nb, np.int64)])
    db = np.concatenate([np.zeros(2 * na, np.int64), np.ones(nb, np.int64), -np.ones(nb, np.int64)])
    order = np.argsort(pts)  # the order among equal points does not matter: see `last`
    pts, ca, cb = pts[order], np.cumsum(da[order]), np.cumsum(db[order])
    # The coverage on [p, next point) is the count after every event at p.
    last = np.r_[np.flatnonzero(np.diff(pts)), len(pts) - 1]
    pts, inside = pts[last], keep(ca[last] > 0, cb[last] > 0)
    inside[-1] = False  # past every range's end
    edges = np.diff(np.r_[0, inside.astype(np.int8)])
    starts = pts[edges == 1]
    ends = pts[np.flatnonzero(edges == -1)] - 1
    return starts, ends


def _sample_id(i: Any) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < MAX_ID:
        raise ValueError(f"sample ids are ints in [0, 2**62), got {i!r}")
    return int(i)


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


Group = tuple[BlacklistEntry, IdSet]


class Blacklist:
    """The run's skipped sample ids, in ``RUN/blacklist.json``.

    Bound to a run directory, every `add`/`remove` is one transaction: take the lock file
    ``RUN/.blacklist.lock`` (``fcntl.flock``), re-read the file, apply the change, write it
    atomically. The trainer, the supervisor and ``thermo blacklist`` may edit at the same time and
    nobody loses an entry. Without a run directory it is an in-memory set (tests, one-off use).

    The ids are kept as ranges (`IdSet`), one group per edit: a million scattered ids are added
    in a fraction of a second and stored in a few MB, and ``0-100000000000`` costs two numbers.

    File format (version 2; version 1, one entry per id, is still read)::

        {"format": "thermo.blacklist", "version": 2,
         "groups": [{"reason": "...", "verdict": {...} | null, "time": 1764200000.0,
                     "source": "guard", "count": 6, "ids": [7, [100, 104]]}, ...]}

    ``ids`` lists single ids and inclusive ``[first, last]`` ranges in increasing order; a group
    of more than 10,000 ranges stores them as ``{"packed": "<base64>", "dtype": "<u2"}`` instead:
    zlib of the little-endian array (start of the first range, its length - 1, the gap - 1 to the
    next start, its length - 1, ...) in the narrowest unsigned type that holds every number.
    An id belongs to one group: the first that added it.

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
        self._groups: list[Group] = []
        self._ids: IdSet | None = None

    @property
    def path(self) -> Path | None:
        return None if self.run_dir is None else RunDir(self.run_dir).blacklist

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
        return sample_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    @property
    def ids(self) -> IdSet:
        """Every blacklisted id: an `IdSet` (set-like, iterates in increasing order)."""
        if self._ids is None:
            self._ids = IdSet().union(*(ids for _, ids in self._groups))
        return self._ids

    @property
    def groups(self) -> list[Group]:
        """(why, ids) per edit, oldest first; an id is in the group that added it first."""
        return list(self._groups)

    @property
    def entries(self) -> dict[int, BlacklistEntry]:
        """id -> why, one item per id (builds a dict of every id: use `groups` for big lists)."""
        return {i: entry for entry, ids in self._groups for i in ids}

    # -- edits -----------------------------------------------------------------------------

    def add(self, ids: Iterable[int], reason: str, verdict: Any = None, source: str = "user") -> list[int]:
        """Skip these sample ids from now on (and persist at once when bound to a run directory).

        Args:
            ids: sample ids (ints >= 0), or an `IdSet`.
            reason: why, in words.
            verdict: the detector verdict (a dataclass or dict; stored as JSON) or None.
            source: ``"guard"``, ``"supervisor"`` or ``"user"``.

        Returns:
            The ids that were not blacklisted before, sorted. Ids already there keep their
            first reason. (`add_set` returns them as an `IdSet`, for ranges too big for a list.)
        """
        return list(self.add_set(IdSet.from_ids(ids), reason, verdict, source))

    def add_set(self, ids: IdSet, reason: str, verdict: Any = None, source: str = "user") -> IdSet:
        """`add` for an `IdSet`; returns the ids added as an `IdSet`."""
        if source not in SOURCES:
            raise ValueError(f"Blacklist.add: source must be one of {SOURCES}, got {source!r}")
        entry = BlacklistEntry(str(reason), _verdict_json(verdict), time.time(), source)
        added = [IdSet()]

        def apply(groups: list[Group]) -> None:
            new = ids - IdSet().union(*(g for _, g in groups))
            if len(new._s):
                groups.append((entry, new))
            added[0] = new

        self._transaction(apply)
        return added[0]

    def remove(self, ids: Iterable[int]) -> list[int]:
        """Serve these sample ids again. Returns the ids that were blacklisted, sorted."""
        return list(self.remove_set(IdSet.from_ids(ids)))

    def remove_set(self, ids: IdSet) -> IdSet:
        """`remove` for an `IdSet`; returns the ids removed as an `IdSet`."""
        removed = [IdSet()]

        def apply(groups: list[Group]) -> None:
            removed[0] = ids & IdSet().union(*(g for _, g in groups))
            groups[:] = [(e, g - ids) for e, g in groups if len((g - ids)._s)]

        self._transaction(apply)
        return removed[0]

    def save(self) -> None:
        """Merge this object's entries into the file (the file's other entries are kept)."""
        if self.run_dir is None:
            raise ValueError("Blacklist.save: this blacklist has no run directory; use Blacklist(run_dir)")
        mine = list(self._groups)

        def apply(groups: list[Group]) -> None:
            for entry, ids in mine:
                new = ids - IdSet().union(*(g for _, g in groups))
                if len(new._s):
                    groups.append((entry, new))

        self._transaction(apply)

    # -- file ------------------------------------------------------------------------------

    def _transaction(self, apply: Callable[[list[Group]], None]) -> None:
        if self.run_dir is None:
            groups = list(self._groups)
            apply(groups)
            self._set(groups)
            return
        with _locked(RunDir(self.run_dir).blacklist_lock):
            # Re-read under the lock: another process may have added entries since our last read.
            groups = self._read()
            apply(groups)
            atomic_write_json(self.path, _to_json(groups))
        self._set(groups)

    def _set(self, groups: list[Group]) -> None:
        self._groups = groups
        self._ids = None

    def _read(self) -> list[Group]:
        assert self.path is not None
        if not self.path.exists():
            return []
        fix = (
            "Repair it (see the format in thermo.data.Blacklist), or move it away to start with an "
            "empty blacklist."
        )
        obj = read_json(self.path, "blacklist", fix)
        return _from_json(obj, self.path, fix)


# -- the file ----------------------------------------------------------------------------------


def _to_json(groups: list[Group]) -> dict[str, Any]:
    return {
        "format": BLACKLIST_FORMAT,
        "version": BLACKLIST_VERSION,
        "groups": [{**dataclasses.asdict(e), "count": len(ids), "ids": _encode(ids)} for e, ids in groups],
    }


def _encode(ids: IdSet) -> Any:
    if len(ids._s) <= _READABLE_RANGES:
        return [a if a == b else [a, b] for a, b in ids.ranges()]
    # Deltas, all >= 0: the first start, its length - 1, the gap (- 1) to the next start, ...
    # in the narrowest unsigned type that holds them all.
    flat = np.empty(2 * len(ids._s), np.int64)
    flat[0::2] = np.r_[ids._s[:1], ids._s[1:] - ids._e[:-1] - 1]
    flat[1::2] = ids._e - ids._s
    dtype = next(t for t in ("<u1", "<u2", "<u4", "<u8") if flat.max() <= np.iinfo(t).max)
    data = zlib.compress(flat.astype(dtype).tobytes(), 1)
    return {"packed": base64.b64encode(data).decode(), "dtype": dtype}


def _decode(obj: Any) -> IdSet:
    """The inverse of `_encode`; ValueError/TypeError on anything malformed."""
    if isinstance(obj, dict):
        packed = obj.get("packed")
        if not isinstance(packed, str):
            raise ValueError('a packed id list needs "packed": "<base64>"')
        dtype = obj.get("dtype", "<u8")
        if dtype not in ("<u1", "<u2", "<u4", "<u8"):
            raise ValueError(f"packed ids have an unknown dtype {dtype!r}")
        raw = zlib.decompress(base64.b64decode(packed, validate=True))
        flat = np.frombuffer(raw, dtype=dtype)
        if len(flat) % 2 or (flat >= MAX_ID).any():
            raise ValueError("packed ids are not pairs of numbers below 2**62")
        flat = flat.astype(np.int64)
        steps = flat.copy()
        steps[2::2] += 1  # the next start is its gap past the previous end + 1
        pos = np.cumsum(steps)
        starts, ends = pos[0::2], pos[1::2]
        return _checked_ranges(starts, ends)
    if not isinstance(obj, list):
        raise ValueError("ids must be a list of ids and [first, last] ranges")
    pairs = []
    for item in obj:
        if isinstance(item, list) and len(item) == 2:
            a, b = _sample_id(item[0]), _sample_id(item[1])
        else:
            a = b = _sample_id(item)
        pairs.append((a, b))
    if not pairs:
        return IdSet()
    arr = np.asarray(pairs, dtype=np.int64)
    return _checked_ranges(arr[:, 0], arr[:, 1])


def _checked_ranges(starts: np.ndarray, ends: np.ndarray) -> IdSet:
    if len(starts) and ((ends < starts).any() or (starts[1:] <= ends[:-1]).any() or ends[-1] >= MAX_ID):
        raise ValueError("ranges must be increasing, disjoint and below 2**62")
    # Sorted and disjoint: only touching ranges ([1, 2], 3) remain to be joined.
    new = np.r_[True, starts[1:] > ends[:-1] + 1] if len(starts) else np.zeros(0, bool)
    return IdSet(starts[new], ends[np.r_[new[1:], True]] if len(starts) else ends)


def _from_json(obj: Any, path: Path, fix: str) -> list[Group]:
    if not isinstance(obj, dict) or obj.get("format") != BLACKLIST_FORMAT:
        raise RunDirError(f'{path} is not a thermo blacklist (no "format": "{BLACKLIST_FORMAT}"). {fix}')
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > BLACKLIST_VERSION:
        raise RunDirError(
            f"{path} has blacklist format version {version!r}; this thermo reads up to "
            f"{BLACKLIST_VERSION}. Upgrade thermo to read it."
        )
    if version < 2:
        return _from_v1(obj, path, fix)
    rows = obj.get("groups")
    if not isinstance(rows, list):
        raise RunDirError(f'{path}: "groups" must be a list. {fix}')
    groups: list[Group] = []
    seen = IdSet()
    for n, row in enumerate(rows):
        try:
            entry = _entry(row)
            ids = _decode(row["ids"]) - seen  # an id belongs to the first group that has it
            seen = seen | ids
        except (KeyError, TypeError, ValueError, AttributeError, zlib.error) as e:
            raise RunDirError(f"{path}: group {n} is malformed ({e!r}). {fix}") from None
        if len(ids._s):
            groups.append((entry, ids))
    return groups


def _entry(row: Any) -> BlacklistEntry:
    if not isinstance(row, dict):
        raise TypeError("not an object")
    verdict = row.get("verdict")
    if verdict is not None and not isinstance(verdict, dict):
        raise ValueError("verdict must be an object or null")
    source = row.get("source", "user")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    return BlacklistEntry(str(row.get("reason", "")), verdict, float(row.get("time", 0.0)), source)


def _from_v1(obj: dict, path: Path, fix: str) -> list[Group]:
    rows = obj.get("entries")
    if not isinstance(rows, list):
        raise RunDirError(f'{path}: "entries" must be a list. {fix}')
    by_why: dict[str, tuple[BlacklistEntry, list[int]]] = {}
    seen: set[int] = set()
    for n, row in enumerate(rows):
        try:
            entry, i = _entry(row), _sample_id(row["id"])
        except (KeyError, TypeError, ValueError) as e:
            raise RunDirError(f"{path}: entry {n} is malformed ({e!r}). {fix}") from None
        if i in seen:
            continue
        seen.add(i)
        key = json.dumps(dataclasses.asdict(entry), sort_keys=True, default=str)
        by_why.setdefault(key, (entry, []))[1].append(i)
    return [(entry, IdSet.from_ids(ids)) for entry, ids in by_why.values()]


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who may share it
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
        bl.add_set(IdSet.from_ids(blacklist), reason="given to the sampler")
    return bl
