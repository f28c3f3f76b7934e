"""Every collective thermo calls, named for what it reduces, and the few torch.distributed facts
it needs. All are safe without a process group (one process: the value itself) and must be
called on every rank alike.

Host-side collectives (`from_rank0`, `gather`, `any_rank`, `barrier`) are host syncs: thermo calls
them at flushes, checkpoints and rollbacks, never inside a step. The device-side ones
(`max_`, `sum_`) reduce in place on the device and never sync.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def _many() -> bool:
    return initialized() and dist.get_world_size() > 1


def from_rank0(obj: T) -> T:
    """Rank 0's `obj` on every rank: its decisions (a verdict, a checkpoint, a replay's finding).
    A pickled broadcast: a host sync."""
    if not _many():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)  # note: a host sync
    return box[0]


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank (the ledger's ids, the hosts, the files
    each rank wrote). A host sync."""
    if not _many():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)  # note: a host sync
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any (a rank whose data ran out, a signal one rank
    got). One small tensor reduced on the backend's device; a host sync."""
    if not _many():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())  # note: a host sync


def barrier() -> None:
    """Every rank waits here (rank 0's files are written before anyone reads them)."""
    if _many():
        dist.barrier()


def max_(t: torch.Tensor) -> torch.Tensor:
    """The elementwise max over ranks, in place on the device (extremes, skip flags). No sync."""
    if _many():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over ranks, in place on the device (squared norms). No sync."""
    if _many():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
