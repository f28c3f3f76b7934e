"""`StatefulLoader`: blacklist skipping for any loader with ``state_dict``/``load_state_dict``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch

from thermo import _dist
from thermo.data.blacklist import Blacklist, _as_blacklist


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
                skip = _dist.any_rank(skip)  # note: a host sync (the data path, before the step)
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
