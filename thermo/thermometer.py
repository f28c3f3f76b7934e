"""`Thermometer`: attach the probes, record each step on the device, flush every few steps."""

from __future__ import annotations

import fnmatch
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn as nn

from thermo import _dist
from thermo._io import atomic_write_json
from thermo.buffer import StatsBuffer
from thermo.probes import (
    DEFAULT_WATCH,
    ActivationHook,
    AttentionProbe,
    AttentionSlots,
    class_names,
    find_attention,
    find_blocks,
    grad_norm_and_nonfinite,
    head_count,
    unwrap,
)
from thermo.store import StepRecord, Store


@dataclass(frozen=True)
class ThermometerConfig:
    """What the thermometer watches and how often it reports.

    Attributes:
        flush_every: steps between flushes. Values stay on the device in between; a flush is
            one collective (under torch.distributed) and one device-to-host copy.
        watch: class names of modules whose output is watched (matched against the class and
            its bases, so subclasses count; ``Conv1D`` is Hugging Face GPT-2's linear layer).
        include: extra module-name patterns to watch (fnmatch, e.g. ``"*.mlp.act"``).
        exclude: module-name patterns never watched (applies to everything above).
        blocks: watch the output of each transformer block (members of a ModuleList or
            Sequential of identical modules).
        grad: whose output gradient amax is recorded: ``"blocks"``, ``"all"`` watched modules,
            or ``"none"``.
        attention: record attention-logit extremes of the attention layers.
        attn_modules: name patterns of the attention modules; empty = find them by class name.
        attn_every: compute the exact logit max/min every this many steps (0 = never). The
            second QKᵀ costs about as much as the attention matmul itself; see
            ``benchmarks/overhead.py`` for the figures behind the default.
        attn_bound: on every step, record a cheap upper bound of |logit| (max‖q‖·max‖k‖·scale)
            for layers using ``scaled_dot_product_attention``.
        attn_per_head: also record the logit extremes of each head.
        attn_heads: head count per attention layer when it cannot be read off the module.
        grad_norm: record the global gradient norm (and the count of non-finite grads).
        count_nonfinite: also count non-finite elements of every watched output (one more
            pass over each output).
        record_eval: also record forwards of modules in eval mode (validation passes).
        sync_flush: process a flush's rows at once (waits for the copy: one host sync per
            flush); otherwise rows are processed on a later step, once the copy has finished.
        extra_scalars: device slots for tensor scalars passed to ``step(**scalars)``.
    """

    flush_every: int = 10
    watch: tuple[str, ...] = DEFAULT_WATCH
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    blocks: bool = True
    grad: Literal["blocks", "all", "none"] = "blocks"
    attention: bool = True
    attn_modules: tuple[str, ...] = ()
    attn_every: int = 10
    attn_bound: bool = True
    attn_per_head: bool = False
    attn_heads: int | None = None
    grad_norm: bool = True
    count_nonfinite: bool = False
    record_eval: bool = False
    sync_flush: bool = False
    extra_scalars: int = 8

    def __post_init__(self):
        for name in ("watch", "include", "exclude", "attn_modules"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(x, str) for x in v):
                raise ValueError(
                    f"ThermometerConfig.{name} must be a tuple of strings, got {v!r}; "
                    f"write {name}=({v!r},) for a single one"
                )
            object.__setattr__(self, name, tuple(v))
        if not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise ValueError(f"ThermometerConfig.flush_every must be an int >= 1, got {self.flush_every!r}")
        if not isinstance(self.attn_every, int) or self.attn_every < 0:
            raise ValueError(
                f"ThermometerConfig.attn_every must be an int >= 0 (0 = never), got {self.attn_every!r}"
            )
        if self.grad not in ("blocks", "all", "none"):
            raise ValueError(
                f"ThermometerConfig.grad must be 'blocks', 'all' or 'none', got {self.grad!r}"
            )
        if self.attn_heads is not None and (not isinstance(self.attn_heads, int) or self.attn_heads < 1):
            raise ValueError(f"ThermometerConfig.attn_heads must be a positive int, got {self.attn_heads!r}")
        if not isinstance(self.extra_scalars, int) or self.extra_scalars < 0:
            raise ValueError(f"ThermometerConfig.extra_scalars must be an int >= 0, got {self.extra_scalars!r}")


class Sink(Protocol):
    """Where flushed records go besides the store (W&B...). Called on rank 0 only."""

    def write(self, records: Sequence[StepRecord]) -> None: ...

    def close(self) -> None: ...


@dataclass
class _RowMeta:
    step: int
    wall_time: float
    exact: bool
    written: set[int] = field(default_factory=set)  # device scalar slots written this step
    has_loss: bool = False
    host: dict[str, float] = field(default_factory=dict)


@dataclass
class _Pending:
    rows: list[_RowMeta]
    event: Any


@dataclass
class Layer:
    """One watched place in the model and the statistics recorded for it."""

    name: str
    kind: str  # "module", "block" or "attention"
    stats: list[str]


class Thermometer:
    """Per-layer activation, gradient and attention-logit extremes, the global gradient norm and
    the loss, recorded every step on the device without a host sync.

    Args:
        model: the model (DDP- and torch.compile-wrapped models are unwrapped). Attach before
            the first compiled call.
        run_dir: where ``thermo.db`` and ``config.json`` go (rank 0 writes). None keeps the
            records in memory only (`step` and `flush` still return them).
        config: a `ThermometerConfig`; keyword overrides of its fields are accepted too.
        sinks: extra destinations for records (e.g. `thermo.sinks.WandbSink`), rank 0 only.
        start_step: the number of the first step recorded.

    Recorded keys (store ``scalars``):

    ==================  ===============================================================
    ``loss``            the loss given to `step`, averaged over ranks
    ``grad_norm``       global L2 norm of the gradients (true global norm under FSDP2/ZeRO)
    ``grad_nonfinite``  gradient tensors (local shards) with a NaN/inf, worst rank
    ``wall_time``       host clock when `step` was called
    any other           keyword scalars given to `step` (floats: as given; tensors: max over ranks)
    ==================  ===============================================================

    Per-layer statistics (store ``layers``, long form):

    ==================  ===============================================================
    ``act_max``         max of the module output (max over ranks and micro-batches)
    ``act_min``         min of the module output
    ``grad_max``        max |gradient| w.r.t. the module output (blocks by default)
    ``act_nonfinite``   largest count of non-finite output elements in one forward (opt-in)
    ``attn_max``        exact max of q·kᵀ·scale over unmasked positions (sampled steps)
    ``attn_min``        exact min of q·kᵀ·scale over unmasked positions (sampled steps)
    ``attn_bound``      max‖q‖·max‖k‖·scale ≥ |logit|, every step (sdpa layers)
    ``attn_*.h<i>``     the same per head (``attn_per_head=True``)
    ==================  ===============================================================

    Example:
        >>> therm = thermo.Thermometer(model, run_dir="runs/exp1")
        >>> for batch in loader:
        ...     loss = model(batch).loss
        ...     loss.backward()
        ...     therm.step(loss)            # no host sync unless a flush is due
        ...     optimizer.step(); optimizer.zero_grad()
        >>> therm.close()
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | Path | None = None,
        config: ThermometerConfig | None = None,
        *,
        sinks: Sequence[Sink] = (),
        start_step: int = 0,
        **overrides: Any,
    ):
        self.config = cfg = replace(config or ThermometerConfig(), **overrides)
        self.model = unwrap(model)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.sinks = list(sinks)
        self.step_count = int(start_step)
        self.attempt = 0
        self._handles: list[Any] = []
        self._attn_probes: list[AttentionProbe] = []
        self._closed = False
        self._row = 0
        self._rows: list[_RowMeta] = []
        self._pending: _Pending | None = None
        self._silence_checked = False
        self.flushes = 0  # flushes so far: the same count on every rank
        self._extra_slots: dict[str, int] = {}

        _reset_stale_compiles()
        device = _model_device(self.model)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.buffer = buf = StatsBuffer(device, cfg.flush_every)
        self.layers = self._plan(buf)
        self._gn_slot = buf.device_scalar("grad_norm") if cfg.grad_norm else None
        self._gnf_slot = buf.device_scalar("grad_nonfinite") if cfg.grad_norm else None
        self._extra_free = [buf.device_scalar(f"extra{i}") for i in range(cfg.extra_scalars)]
        self._loss_slot = buf.sum_scalar("loss")
        buf.allocate()
        self._attach(buf)
        self._set_exact()

        self.store: Store | None = None
        if self.run_dir is not None and _dist.is_rank0():
            self.store = Store(self.run_dir)
            self.attempt = self.store.current_attempt()
            self.store.set_meta("layers", [asdict(layer) for layer in self.layers])
            self.store.set_meta("thermometer", asdict(cfg))
            atomic_write_json(self.run_dir / "config.json", {"thermometer": asdict(cfg)})

    # -- attaching -------------------------------------------------------------------------

    def _plan(self, buf: StatsBuffer) -> list[Layer]:
        """Choose the watched modules and attention layers and declare their slots."""
        cfg = self.config
        blocks = set(find_blocks(self.model)) if cfg.blocks else set()
        attn = set(find_attention(self.model, cfg.attn_modules)) if cfg.attention else set()
        attn -= {n for n in attn if fnmatch_any(n, cfg.exclude)}
        watch = set(cfg.watch)
        self._act_plan: list[tuple[str, nn.Module, dict]] = []
        self._attn_plan: list[tuple[str, nn.Module, dict, int | None]] = []
        layers = []
        for name, mod in self.model.named_modules():
            if not name or fnmatch_any(name, cfg.exclude):
                continue
            is_block = name in blocks
            if is_block or (class_names(mod) & watch) or fnmatch_any(name, cfg.include):
                grad = cfg.grad == "all" or (cfg.grad == "blocks" and is_block)
                slots = {"act_max": buf.max_slot(name, "act_max"), "act_min": buf.min_slot(name, "act_min")}
                if grad:
                    slots["grad_max"] = buf.max_slot(name, "grad_max")
                if cfg.count_nonfinite:
                    slots["act_nonfinite"] = buf.max_slot(name, "act_nonfinite")
                self._act_plan.append((name, mod, slots))
                layers.append(Layer(name, "block" if is_block else "module", list(slots)))
            if name in attn:
                heads = None
                if cfg.attn_per_head:
                    heads = cfg.attn_heads or head_count(mod)
                    if heads is None:
                        raise ValueError(
                            f"attn_per_head=True but the number of heads of attention layer "
                            f"{name!r} ({type(mod).__name__}) cannot be read off the module; "
                            "set ThermometerConfig.attn_heads"
                        )
                slots = {
                    "attn_max": buf.max_slot(name, "attn_max"),
                    "attn_min": buf.min_slot(name, "attn_min"),
                    "attn_bound": buf.max_slot(name, "attn_bound"),
                }
                if heads:
                    for stat, declare in (("attn_max", buf.max_slot), ("attn_min", buf.min_slot),
                                          ("attn_bound", buf.max_slot)):
                        first = declare(name, f"{stat}.h0")
                        for h in range(1, heads):
                            declare(name, f"{stat}.h{h}")
                        slots[f"{stat}.heads"] = first
                self._attn_plan.append((name, mod, slots, heads))
                layers.append(Layer(name, "attention", [s for s in slots if not s.endswith(".heads")]))
        if cfg.attention and not self._attn_plan:
            hint = ("no module matches attn_modules=" + repr(cfg.attn_modules)) if cfg.attn_modules else (
                "no module class name contains 'attention' or 'attn'")
            warnings.warn(
                f"thermo found no attention layer in {type(self.model).__name__} ({hint}); "
                "attention logits will not be recorded. Name them with "
                "ThermometerConfig(attn_modules=('*.attn',)), or set attention=False.",
                stacklevel=3,
            )
        return layers

    def _attach(self, buf: StatsBuffer) -> None:
        cfg = self.config
        for _name, mod, slots in self._act_plan:
            hook = ActivationHook(
                amax=buf.view(slots["act_max"]),
                amin=buf.view(slots["act_min"]),
                grad_amax=buf.view(slots["grad_max"]) if "grad_max" in slots else None,
                nonfinite=buf.view(slots["act_nonfinite"]) if "act_nonfinite" in slots else None,
                record_eval=cfg.record_eval,
            )
            self._handles.append(mod.register_forward_hook(hook))
        for _name, mod, slots, heads in self._attn_plan:
            s = AttentionSlots(
                max=buf.view(slots["attn_max"]),
                min=buf.view(slots["attn_min"]),
                bound=buf.view(slots["attn_bound"]),
            )
            if heads:
                s.head_max = buf.view(slots["attn_max.heads"], heads)
                s.head_min = buf.view(slots["attn_min.heads"], heads)
                s.head_bound = buf.view(slots["attn_bound.heads"], heads)
            probe = AttentionProbe(s, bound=cfg.attn_bound)
            self._attn_probes.append(probe)
            self._handles.append(mod.register_forward_pre_hook(probe.pre_hook))
            # always_call: the probe is popped even when the forward raises.
            self._handles.append(mod.register_forward_hook(probe.post_hook, always_call=True))

    def _set_exact(self) -> None:
        """Tell the attention probes whether the next step is a sampled (exact-logit) one."""
        exact = self._is_exact()
        for probe in self._attn_probes:
            probe.exact = exact

    # -- recording -------------------------------------------------------------------------

    def step(
        self,
        loss: torch.Tensor | float | None = None,
        *,
        grad_norm: torch.Tensor | float | None = None,
        step: int | None = None,
        **scalars: torch.Tensor | float,
    ) -> list[StepRecord]:
        """Record the step that just ran its backward: call it after ``loss.backward()`` and
        before ``optimizer.zero_grad()``.

        Args:
            loss: this rank's loss (averaged over ranks when recorded).
            grad_norm: the global gradient norm if you already have it, e.g. what
                ``clip_grad_norm_`` returned (pass it: after clipping, the gradients no longer
                have their original norm). Otherwise thermo computes it.
            step: the step number, if you keep your own (default: one more than the last).
            scalars: more per-step values (learning rate...). Python numbers are stored as
                given; tensors stay on the device and are max-reduced over ranks.

        Returns:
            The records processed during this call (rank 0, on flush steps or once a flush's
            copy has landed; otherwise empty).
        """
        if self._closed:
            raise RuntimeError("Thermometer.step() after close(): create a new Thermometer")
        if step is not None:
            self.step_count = int(step)
        meta = _RowMeta(step=self.step_count, wall_time=time.time(), exact=self._is_exact())
        dev: dict[int, torch.Tensor] = {}
        if isinstance(grad_norm, torch.Tensor):
            dev[self._gn_slot] = _as_device_scalar(grad_norm)
        elif grad_norm is not None:
            meta.host["grad_norm"] = float(grad_norm)
        elif self.config.grad_norm:
            gn, nonfinite = grad_norm_and_nonfinite(self._params)
            if gn is not None:
                dev[self._gn_slot], dev[self._gnf_slot] = gn, nonfinite
        for key, value in scalars.items():
            if isinstance(value, torch.Tensor):
                dev[self._extra_slot(key)] = _as_device_scalar(value)
            else:
                meta.host[key] = float(value)
        sums = {}
        if loss is not None:
            sums[self._loss_slot] = loss.detach().float() if isinstance(loss, torch.Tensor) else float(loss)
            meta.has_loss = True
        meta.written = set(dev)
        self.buffer.write_step(self._row, dev, sums)
        self._rows.append(meta)
        self._row += 1
        self.step_count += 1
        self._set_exact()

        done: list[StepRecord] = []
        if self._pending is not None and _event_done(self._pending.event):
            done = self._process()
        if self._row == self.config.flush_every:
            done += self.flush(wait=self.config.sync_flush)
        return done

    @property
    def flush_due(self) -> bool:
        """True when the next `step` call flushes (the same on every rank)."""
        return self._row + 1 >= self.config.flush_every

    def _is_exact(self) -> bool:
        every = self.config.attn_every
        return every > 0 and self.step_count % every == 0

    def _extra_slot(self, key: str) -> int:
        slot = self._extra_slots.get(key)
        if slot is None:
            if not self._extra_free:
                raise ValueError(
                    f"too many tensor scalars given to Thermometer.step (new: {key!r}, already "
                    f"{sorted(self._extra_slots)}); raise ThermometerConfig.extra_scalars or pass "
                    "Python numbers"
                )
            slot = self._extra_slots[key] = self._extra_free.pop(0)
        return slot

    def flush(self, wait: bool = True) -> list[StepRecord]:
        """Reduce the buffered steps across ranks and copy them out (every rank must call it).

        Args:
            wait: also wait for the copy and process the rows now (one host sync).

        Returns:
            The records processed by this call (rank 0; empty on other ranks).
        """
        done = self._process() if self._pending is not None else []
        if self._row:
            self.flushes += 1
            self.buffer.reduce(self._row)
            event = self.buffer.copy_out()
            self._pending = _Pending(rows=self._rows, event=event)
            self._rows, self._row = [], 0
            if wait or event is None:
                done += self._process()
        return done

    def _process(self) -> list[StepRecord]:
        pending, self._pending = self._pending, None
        if pending.event is not None:
            pending.event.synchronize()  # note: host sync; the copy was issued a flush earlier or wait=True
        if not _dist.is_rank0():
            return []
        values, recorded, sums = self.buffer.host_rows(len(pending.rows))
        cols = self.buffer.columns
        n_layer_cols = self.buffer.n_max + self.buffer.n_min
        dev_names = {i: c.stat for i, c in enumerate(cols[n_layer_cols:])}
        extra_names = {slot: key for key, slot in self._extra_slots.items()}
        records = []
        for r, meta in enumerate(pending.rows):
            rec = StepRecord(step=meta.step, attempt=self.attempt)
            idx = np.flatnonzero(recorded[r, :n_layer_cols])
            vals = values[r, idx].tolist()
            rec.layers = {(cols[j].layer, cols[j].stat): v for j, v in zip(idx.tolist(), vals)}
            if meta.has_loss:
                rec.scalars["loss"] = float(sums[r, self._loss_slot])
            for slot in sorted(meta.written):
                name = extra_names.get(slot, dev_names[slot])
                rec.scalars[name] = float(values[r, n_layer_cols + slot])
            rec.scalars.update(meta.host)
            rec.scalars["wall_time"] = meta.wall_time
            records.append(rec)
        self._check_silence(pending.rows, records)
        if self.store is not None:
            self.store.write(records)
        for sink in self.sinks:
            sink.write(records)
        return records

    def _check_silence(self, rows: list[_RowMeta], records: list[StepRecord]) -> None:
        """Once, after the first flush with a sampled step: warn about probes that never fired."""
        if self._silence_checked or not any(m.exact for m in rows):
            return
        self._silence_checked = True
        seen = {layer for rec in records for (layer, _stat) in rec.layers}
        act = [n for n, _m, _s in self._act_plan]
        if act and not any(n in seen for n in act):
            warnings.warn(
                f"no thermometer hook fired in {len(rows)} steps. If the model was compiled "
                "before thermo attached, its compiled code skips hooks: attach first, then "
                "compile. If the model was in eval mode, set record_eval=True.",
                stacklevel=4,
            )
            return
        silent = [n for n, *_ in self._attn_plan if n not in seen]
        if silent:
            warnings.warn(
                f"attention layers {silent} were found but no attention logits were seen in "
                f"{len(rows)} steps: they do not call scaled_dot_product_attention, softmax or "
                "multi_head_attention_forward inside the module, so thermo cannot read their "
                "logits. Point attn_modules at the module that does.",
                stacklevel=4,
            )

    # -- state and removal -----------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_count, "attempt": self.attempt}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume numbering at a saved position. Unflushed rows are dropped (they belong to
        steps after the saved one, which are being redone)."""
        self._rows, self._row = [], 0
        self.buffer.acc_max.fill_(float("-inf"))
        self.buffer.acc_min.fill_(float("inf"))
        self.step_count = int(state["step"])
        self.attempt = int(state.get("attempt", self.attempt))
        self._set_exact()

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before thermo attached. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._attn_probes.clear()

    def close(self) -> None:
        """Flush what is buffered, remove the hooks and close the store. Idempotent; under
        torch.distributed every rank must call it (the flush is a collective)."""
        if self._closed:
            return
        try:
            self.flush(wait=True)
        finally:
            self._closed = True
            self.remove()
            for sink in self.sinks:
                sink.close()
            if self.store is not None:
                self.store.close()

    def __enter__(self) -> Thermometer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fnmatch_any(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device if t.device.type != "meta" else torch.device("cpu")
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _as_device_scalar(value: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().float().reshape(())


def _event_done(event) -> bool:
    return event is None or event.query()


def _reset_stale_compiles() -> None:
    """Hooks added to a module torch.compile already traced never fire (hook guards are skipped),
    silently. If dynamo holds compiled code, drop it so the next call retraces with the hooks."""
    try:
        from torch._dynamo import convert_frame

        compiled = any(ref() is not None for ref in convert_frame.input_codes.seen)
    except (ImportError, AttributeError):  # internals moved: the first flush's silence check warns
        compiled = False
    if compiled:
        torch._dynamo.reset()
        warnings.warn(
            "torch.compile had already compiled code in this process before thermo attached; "
            "hooks added to compiled modules never fire, so thermo reset torch.compile's cache "
            "(torch._dynamo.reset()) and the next call recompiles. Attach thermo before the "
            "first compiled call to avoid this.",
            stacklevel=3,
        )

