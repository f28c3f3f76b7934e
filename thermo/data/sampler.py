"""`ResumableSampler`: global batches from a seeded per-epoch permutation, blacklisted ids left out."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch

from thermo import _dist
from thermo.data.blacklist import Blacklist, _as_blacklist

SAMPLER_STATE_VERSION = 1


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
