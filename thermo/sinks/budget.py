"""Which keys a sink logs each step: the key budget shared by `WandbSink` and `TensorBoardSink`.

A 24-layer GPT records ~550 per-layer values a step; logged as they are, they flood a W&B
workspace (and its rate limits) and bury the few curves that matter. The budget logs, each step:

- every scalar (``thermo/loss``, ``thermo/grad_norm``...);
- one aggregate per block and statistic for `KeyBudget.block_stats` (``block_act_max/h.3``: the
  max over the block's modules; the min for ``*_min`` statistics; a non-finite value wins);
- the `KeyBudget.hottest` layers of each statistic by |value| (``act_max/h.17.mlp.c_fc``); a
  layer keeps its one key, so its curve has a point wherever it was among the hottest;

capped at `KeyBudget.max_keys`, and the full per-layer table only at flushes (see the sinks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thermo.plots.shared import block_of
from thermo.rundir import RunDir
from thermo.store import StepRecord

# Keys every row carries besides the budgeted ones: thermo/step, thermo/train_step, thermo/attempt.
RESERVED_KEYS = 3


@dataclass(frozen=True)
class KeyBudget:
    """How many keys a sink logs per step (see the module docstring).

    Attributes:
        max_keys: most keys in one step's row, the reserved step/attempt keys included. Lowest
            priority first, hottest layers then block aggregates are cut to fit; scalars always go.
        hottest: per statistic, how many of the hottest layers get their own key each step.
        block_stats: statistics aggregated per block each step.
        stats: per-layer statistics considered at all (None: every one recorded).
        full: every per-layer value every step, no budget (small models only).
    """

    max_keys: int = 100
    hottest: int = 4
    block_stats: tuple[str, ...] = ("act_max", "attn_max")
    stats: tuple[str, ...] | None = None
    full: bool = False

    def __post_init__(self):
        if not isinstance(self.max_keys, int) or self.max_keys < RESERVED_KEYS + 1:
            raise ValueError(f"KeyBudget.max_keys must be an int >= {RESERVED_KEYS + 1}, got {self.max_keys!r}")
        if not isinstance(self.hottest, int) or self.hottest < 0:
            raise ValueError(f"KeyBudget.hottest must be an int >= 0, got {self.hottest!r}")
        if isinstance(self.block_stats, str) or (self.stats is not None and isinstance(self.stats, str)):
            raise ValueError("KeyBudget.block_stats and .stats are lists of statistic names, "
                             "e.g. ('act_max', 'attn_max'), not one string")

    def row(self, rec: StepRecord) -> dict[str, float]:
        """The budgeted keys of one record (without the reserved step/attempt keys)."""
        row = {f"thermo/{k}": v for k, v in rec.scalars.items() if k != "wall_time"}
        by_stat: dict[str, list[tuple[str, float]]] = {}
        for (layer, stat), value in rec.layers.items():
            if self.stats is None or stat in self.stats:
                by_stat.setdefault(stat, []).append((layer, value))
        if self.full:
            for stat, items in by_stat.items():
                row.update((f"{stat}/{layer}", v) for layer, v in items)
            return row
        room = self.max_keys - RESERVED_KEYS - len(row)
        blocks: dict[str, float] = {}
        for stat in self.block_stats:
            low = stat.endswith("_min")
            for layer, v in by_stat.get(stat, ()):
                block = block_of(layer)
                if block is None:
                    continue
                key = f"block_{stat}/{block}"
                old = blocks.get(key)
                if old is None or not math.isfinite(v) or (
                        math.isfinite(old) and (v < old if low else v > old)):
                    if old is None or math.isfinite(old):  # the first non-finite value stays
                        blocks[key] = v
        hot: list[tuple[int, str, float]] = []
        for stat, items in by_stat.items():
            # NaN/inf are hottest: the layer that broke is the one to see.
            ranked = sorted(items, key=lambda lv: -abs(lv[1]) if math.isfinite(lv[1]) else -math.inf)
            hot.extend((rank, f"{stat}/{layer}", v) for rank, (layer, v) in enumerate(ranked[: self.hottest]))
        hot.sort(key=lambda t: t[0])  # every statistic's hottest before any one's second
        for key, v in list(blocks.items())[: max(0, room)]:
            row[key] = v
        room -= min(len(blocks), max(0, room))
        for _, key, v in hot[: max(0, room)]:
            row[key] = v
        return row

    def table(self, rec: StepRecord) -> list[list]:
        """The full per-layer table of one record: [step, layer, stat, value] rows."""
        return [[rec.step, layer, stat, value] for (layer, stat), value in sorted(rec.layers.items())
                if self.stats is None or stat in self.stats]


class StepAxis:
    """thermo/step for loggers: the training step plus every step rolled back so far, so it never
    goes back (a rollback from step 30 to 20 continues at 31, not 21). The training step itself is
    logged as ``thermo/train_step``."""

    def __init__(self):
        self.offset = 0
        self.last: int | None = None

    def __call__(self, step: int) -> int:
        if self.last is not None and step <= self.last:
            self.offset += self.last - step + 1  # a rollback or restart re-trains these steps
        self.last = step
        return step + self.offset

    def at(self, step: int) -> int:
        """thermo/step of an event at training `step` (the current branch)."""
        return step + self.offset


def events_after(run_dir: Path, last_id: int) -> list[dict[str, Any]]:
    """The run's events with an id above `last_id`, oldest first, as dicts (kind, message, step
    or None, data, id); empty while the store is missing, being created, busy or foreign (the
    sinks poll again at their next write)."""
    run = RunDir(run_dir)
    if not run.db.is_file():
        return []
    try:
        with run.store(readonly=True) as store:
            ev = store.events(after_id=last_id)
    except Exception:  # try again at the next poll
        return []
    out = []
    for _, e in ev.iterrows():
        step = None if e["step"] is None or e["step"] != e["step"] else int(e["step"])
        out.append({"kind": e["kind"], "message": e["message"], "step": step, "data": e["data"], "id": int(e["id"])})
    return out
