"""What fills a checkpoint folder: the `CheckpointBackend` protocol and `DCPBackend`, the default,
with the DCP state dicts and RNG states it saves."""

from __future__ import annotations

import pickle
import random
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from thermo import _dist


class CheckpointBackend(Protocol):
    """Writes and reads the framework state inside one checkpoint folder. `Checkpoints` keeps the
    manifest, ``thermo.json`` (data positions, thermo's state), health and retention; the backend
    only fills the folder. Every method is called on every rank, together.

    `save` gets the path of a folder that does not exist yet (its parent does) and creates it.
    `load` changes the live objects in place; it must check what it can before changing anything.
    `torn` says why the folder cannot be loaded (missing or short files) or returns None; it runs
    on rank 0 only. `name` is recorded in the manifest, so that a process without the live objects
    (``thermo supervise``) knows who wrote the folders.
    """

    name: str

    def save(self, path: Path, model: Any, optimizer: Any, scheduler: Any, rng: bool) -> None: ...

    def load(self, path: Path, model: Any, optimizer: Any, scheduler: Any, rng: bool) -> None: ...

    def torn(self, path: Path) -> str | None: ...


def backend_name(backend: CheckpointBackend) -> str:
    """What the manifest records of `backend` (a backend without `name`: its class name)."""
    return getattr(backend, "name", type(backend).__name__)


class DCPBackend:
    """The default backend: model, optimizer, scheduler and each rank's RNG through
    ``torch.distributed.checkpoint`` (plain, DDP, FSDP2, DDP + ZeroRedundancyOptimizer).

    A checkpoint loads on another number of ranks: every state is keyed by parameter name, so DCP
    lays FSDP2's shards out anew. ZeroRedundancyOptimizer's own ``state_dict()`` is laid out by
    rank partition and is never saved: each rank saves its local optimizer's state (the
    parameters it owns, by name; together every parameter once) and loads whatever the new
    partition gives it; the global param groups travel once, as ``optim_groups``. RNG states are
    per rank: a rank that did not exist warns and keeps its own."""

    name = "dcp"

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
        # No unpickling here: DCP's .metadata is a pickle, and judging a folder must not run what
        # a crafted one holds. Presence and sizes here; `Checkpoints.torn` adds the checksums the
        # manifest recorded while saving, which catch a changed byte of any file.
        meta = path / ".metadata"
        if not meta.is_file():
            return ".metadata is missing: the save did not finish or files were deleted"
        if meta.stat().st_size == 0:
            return ".metadata is empty"
        shards = sorted(path.glob("*.distcp"))
        if not shards:
            return "no .distcp data file: the save did not finish or files were deleted"
        for f in shards:
            if f.is_symlink() or f.stat().st_size == 0:
                return f"{f.name} is empty or a symlink"
        return None


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
