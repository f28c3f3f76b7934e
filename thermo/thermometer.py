"""`Thermometer`: attach the probes, record each step on the device, flush every few steps."""

from __future__ import annotations

import os
import sys
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
    ROOT,
    ActivationHook,
    AttentionFinder,
    AttentionProbe,
    AttentionSlots,
    Found,
    class_names,
    find_blocks,
    grad_norm_and_nonfinite,
    head_count,
    path_matches,
    pattern_candidates,
    unwrap,
)
from thermo.rundir import RunDir
from thermo.store import StepRecord, Store


@dataclass(frozen=True)
class ThermometerConfig:
    """What the thermometer watches and how often it reports.

    Attributes:
        flush_every: steps between flushes. Values stay on the device in between; a flush is
            one collective (under torch.distributed) and one device-to-host copy.
        watch: class names of modules whose output is watched (matched against the class and
            its bases, so subclasses count; ``Conv1D`` is Hugging Face GPT-2's linear layer).
        include: extra module paths to watch. Patterns are module-path globs: ``*`` and ``?``
            stay within one dotted component, ``**`` spans any number (``"h.*.mlp.act"``,
            ``"**.act"``). Every pattern here, in `exclude` and in `attn_modules` must match a
            module when the thermometer is created, or it raises ``ValueError``.
        exclude: module paths never watched, nor anything inside them (applies to everything
            above and to attention layers).
        blocks: watch the output of each transformer block (members of a ModuleList or
            Sequential of identical modules).
        grad: whose output gradient amax is recorded: ``"blocks"``, ``"all"`` watched modules,
            or ``"none"``.
        attention: record attention-logit extremes of the attention layers.
        attn_modules: paths of the attention modules (globs as in `include`); empty = the
            modules found computing attention in the first forward. A named module must compute
            attention (itself or inside it) or the first `step` raises ``ValueError``.
        attn_every: compute the exact logit max/min every this many steps (0 = never). The
            second QKᵀ costs about as much as the attention matmul itself; see
            ``benchmarks/overhead.py`` for the figures behind the default.
        attn_bound: on every step, record a cheap upper bound of |logit| (max‖q‖·max‖k‖·scale)
            for layers using ``scaled_dot_product_attention``.
        attn_per_head: also record the logit extremes of each head.
        attn_heads: head count per attention layer when the logits' layout does not show it
            (a softmax over (batch·heads, L, S)) and the module has no head attribute.
        grad_norm: record the global gradient norm (and the count of non-finite grads).
        count_nonfinite: also count non-finite elements of every watched output (one more
            pass over each output).
        record_eval: also record forwards of modules in eval mode (validation passes).
        sync_flush: process a flush's rows at once (waits for the copy: one host sync per
            flush); otherwise rows are processed on a later step, once the copy has finished.
            None: False, except under a Guard (or `Watch`), which judges each flush at once and
            refuses False.
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
    sync_flush: bool | None = None
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
            the first compiled call. Its attention layers are found on its first forward
            (the modules that call scaled_dot_product_attention, flex_attention,
            multi_head_attention_forward or a softmax over a q @ kᵀ product) and join `layers` at the first `step`.
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
    ``attn_max``        exact max of the logits the softmax sees, q·kᵀ·scale + any additive
                        bias (T5 position bias, ALiBi, a float mask's finite values), over
                        unmasked positions (sampled steps); the same on sdpa and eager paths
    ``attn_min``        exact min of the same (sampled steps)
    ``attn_bound``      max‖q‖·max‖k‖·scale + max|bias| ≥ |logit|, every step (sdpa layers)
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
        self._names = [name for name, _ in self.model.named_modules()]
        self._check_patterns()
        self._device = _model_device(self.model)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._act_hooks: list[ActivationHook] = []
        # Until the first step, the finder looks for the attention; its layers join the buffer then.
        self.buffer = self._new_buffer({})
        self._attach_activations()
        self._finder: AttentionFinder | None = None
        if cfg.attention:
            self._finder = AttentionFinder(self.model, cfg.record_eval, cfg.attn_bound)
        self._set_exact()

        self.store: Store | None = None
        if self.run_dir is not None and _dist.is_rank0():
            self.store = Store(self.run_dir)
            self.attempt = self.store.current_attempt()
            self.store.set_meta("layers", [asdict(layer) for layer in self.layers])
            self.store.set_meta("thermometer", asdict(cfg))
            atomic_write_json(RunDir(self.run_dir).config, {"thermometer": asdict(cfg)})

    # -- attaching -------------------------------------------------------------------------

    def _check_patterns(self) -> None:
        """Every module-path pattern must match a module: a typo would silently watch nothing."""
        cfg = self.config
        names = [n or ROOT for n in self._names]
        for fname in ("include", "exclude", "attn_modules"):
            for p in getattr(cfg, fname):
                if not any(path_matches(n, (p,)) for n in names):
                    raise ValueError(
                        f"ThermometerConfig.{fname}: pattern {p!r} matches no module of "
                        f"{type(self.model).__name__}. Patterns are module paths: '*' stays within "
                        f"one dotted component, '**' spans several (e.g. 'blocks.*.attn', '**.attn'). "
                        f"Modules it may mean: {pattern_candidates(p, names)}"
                    )

    def _excluded(self, name: str) -> bool:
        """A module is excluded if it or a module around it matches `exclude`."""
        if not self.config.exclude:
            return False
        parts = (name or ROOT).split(".")
        return any(path_matches(".".join(parts[:i]), self.config.exclude) for i in range(1, len(parts) + 1))

    def _new_buffer(self, attn: dict[str, int | None]) -> StatsBuffer:
        """Declare every slot (watched modules, the attention layers `attn`: module path ->
        per-head count or None, step scalars) and allocate the device buffer."""
        cfg = self.config
        buf = StatsBuffer(self._device, cfg.flush_every)
        self.layers = self._plan(buf, attn)
        self._gn_slot = buf.device_scalar("grad_norm") if cfg.grad_norm else None
        self._gnf_slot = buf.device_scalar("grad_nonfinite") if cfg.grad_norm else None
        # Same declaration order every time: the slot numbers of `_extra_slots` stay valid.
        free = [buf.device_scalar(f"extra{i}") for i in range(cfg.extra_scalars)]
        self._extra_free = [s for s in free if s not in self._extra_slots.values()]
        self._loss_slot = buf.sum_scalar("loss")
        buf.allocate()
        return buf

    def _plan(self, buf: StatsBuffer, attn: dict[str, int | None]) -> list[Layer]:
        """Choose the watched modules, declare their slots and those of the attention layers."""
        cfg = self.config
        blocks = set(find_blocks(self.model)) if cfg.blocks else set()
        watch = set(cfg.watch)
        self._act_plan: list[tuple[str, nn.Module, dict]] = []
        self._attn_plan: list[tuple[str, nn.Module, dict, int | None]] = []
        layers = []
        for name, mod in self.model.named_modules():
            is_block = name in blocks
            if name and not self._excluded(name) and (
                    is_block or (class_names(mod) & watch) or path_matches(name, cfg.include)):
                grad = cfg.grad == "all" or (cfg.grad == "blocks" and is_block)
                slots = {"act_max": buf.max_slot(name, "act_max"), "act_min": buf.min_slot(name, "act_min")}
                if grad:
                    slots["grad_max"] = buf.max_slot(name, "grad_max")
                if cfg.count_nonfinite:
                    slots["act_nonfinite"] = buf.max_slot(name, "act_nonfinite")
                self._act_plan.append((name, mod, slots))
                layers.append(Layer(name, "block" if is_block else "module", list(slots)))
            if name in attn:
                layer = name or ROOT
                heads = attn[name]
                slots = {
                    "attn_max": buf.max_slot(layer, "attn_max"),
                    "attn_min": buf.min_slot(layer, "attn_min"),
                    "attn_bound": buf.max_slot(layer, "attn_bound"),
                }
                if heads:
                    for stat, declare in (("attn_max", buf.max_slot), ("attn_min", buf.min_slot),
                                          ("attn_bound", buf.max_slot)):
                        first = declare(layer, f"{stat}.h0")
                        for h in range(1, heads):
                            declare(layer, f"{stat}.h{h}")
                        slots[f"{stat}.heads"] = first
                self._attn_plan.append((name, mod, slots, heads))
                layers.append(Layer(layer, "attention", [s for s in slots if not s.endswith(".heads")]))
        return layers

    def _attach_activations(self) -> None:
        cfg, buf = self.config, self.buffer
        for _name, mod, slots in self._act_plan:
            hook = ActivationHook(
                amax=buf.view(slots["act_max"]),
                amin=buf.view(slots["act_min"]),
                grad_amax=buf.view(slots["grad_max"]) if "grad_max" in slots else None,
                nonfinite=buf.view(slots["act_nonfinite"]) if "act_nonfinite" in slots else None,
                record_eval=cfg.record_eval,
            )
            self._act_hooks.append(hook)
            self._handles.append(mod.register_forward_hook(hook))

    def _attach_attention(self) -> None:
        cfg, buf = self.config, self.buffer
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
            probe = AttentionProbe(s, bound=cfg.attn_bound, heads=heads or cfg.attn_heads or head_count(mod),
                                   record_eval=cfg.record_eval)
            self._attn_probes.append(probe)
            self._handles.append(mod.register_forward_pre_hook(probe.pre_hook))
            # always_call: the probe is popped even when the forward raises.
            self._handles.append(mod.register_forward_hook(probe.post_hook, always_call=True))

    def _finish_discovery(self) -> None:
        """At the first step after a recorded forward: probe the attention the finder saw, with
        the logits it measured in those forwards, and drop the finder's hooks."""
        finder, self._finder = self._finder, None
        finder.remove()
        attn = self._choose_attention(finder.found)
        if self._row or self._pending is not None:
            # Steps were recorded before any forward (rare): write them out in the old layout.
            self.flush(wait=True)  # note: host sync, once
        old_buf, old_plan = self.buffer, self._act_plan
        self.buffer = buf = self._new_buffer(attn)
        # Carry the activations of this step over and point the hooks at the new accumulators.
        for hook, (_, _, old), (_, _, new) in zip(self._act_hooks, old_plan, self._act_plan):
            for key in new:
                buf.view(new[key]).copy_(old_buf.view(old[key]))
            hook.amax, hook.amin = buf.view(new["act_max"]), buf.view(new["act_min"])
            hook.grad_amax = buf.view(new["grad_max"]) if "grad_max" in new else None
            hook.nonfinite = buf.view(new["act_nonfinite"]) if "act_nonfinite" in new else None
        self._attach_attention()
        for probe, (name, *_rest) in zip(self._attn_probes, self._attn_plan):
            for got in finder.found[name].measured:
                # A call whose layout shows no heads (a 3-d softmax) gives the layer's extremes only.
                probe.record(got, per_head=probe.slots.head_max is None
                             or got.heads == probe.slots.head_max.shape[0])
        self._set_exact()
        if self.store is not None:
            self.store.set_meta("layers", [asdict(layer) for layer in self.layers])

    def _choose_attention(self, found: dict[str, Found]) -> dict[str, int | None]:
        """Module path -> per-head count (None unless attn_per_head) of the attention layers."""
        cfg = self.config
        mods = dict(self.model.named_modules())
        computing = [n for n in self._names if n in found and found[n].kinds]
        shown = ", ".join(repr(n or ROOT) for n in computing) or "none"
        if cfg.attn_modules:
            chosen = [n for n in self._names if path_matches(n or ROOT, cfg.attn_modules)]
            idle = [n or ROOT for n in chosen if not (n in found and found[n].inside)]
            if idle:
                raise ValueError(
                    f"ThermometerConfig.attn_modules={cfg.attn_modules!r} names {idle}, which computed "
                    "no attention in the first forward (no scaled_dot_product_attention, flex_attention, "
                    "multi_head_attention_forward or softmax over a q @ kᵀ product ran inside). "
                    f"Attention is computed in: {shown}. Name those, or leave attn_modules empty to "
                    "watch them."
                )
        else:
            chosen = computing
        chosen = [n for n in chosen if not self._excluded(n)]
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if isinstance(impl, str) and impl not in ("eager", "sdpa", "flex_attention"):
            warnings.warn(
                f"{type(self.model).__name__} computes attention with attn_implementation={impl!r}, "
                "whose logits thermo cannot read; load or configure the model with "
                "attn_implementation='sdpa' (or 'eager', 'flex_attention') to record them.",
                stacklevel=4,
            )
        elif not chosen:
            warnings.warn(
                f"thermo saw no attention computed in the first forward of {type(self.model).__name__}: "
                "no module called scaled_dot_product_attention, flex_attention, "
                "multi_head_attention_forward or a softmax over a q @ kᵀ product, so attention "
                "logits will not be recorded. A kernel "
                "thermo cannot see (flash-attn, xformers) hides them; set attention=False if the "
                "model has no attention.",
                stacklevel=4,
            )
        attn = {}
        for n in chosen:
            heads = None
            if cfg.attn_per_head:
                heads = found[n].heads or cfg.attn_heads or head_count(mods[n])
                if heads is None:
                    raise ValueError(
                        f"attn_per_head=True but the number of heads of attention layer {n or ROOT!r} "
                        f"({type(mods[n]).__name__}) shows neither in its logits' layout nor on the "
                        "module; set ThermometerConfig.attn_heads"
                    )
            attn[n] = heads
        return attn

    def _set_exact(self) -> None:
        """Tell the attention probes whether the next step is a sampled (exact-logit) one."""
        exact = self._is_exact()
        for probe in self._attn_probes:
            probe.exact = exact
        if self._finder is not None:
            self._finder.exact = exact

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
        _check_scalars(loss=loss, grad_norm=grad_norm, **scalars)
        if self._finder is not None and self._finder.seen:
            self._finish_discovery()
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
            done += self.flush(wait=bool(self.config.sync_flush))
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
        if (act or self._attn_plan) and seen.isdisjoint(act) and seen.isdisjoint(
                n or ROOT for n, *_ in self._attn_plan):
            warnings.warn(
                f"no thermometer hook fired in {len(rows)} steps. If the model was compiled "
                "before thermo attached, its compiled code skips hooks: attach first, then "
                "compile. If the model was in eval mode, set record_eval=True.",
                stacklevel=4,
            )
            return
        idle = [n for n in act if n not in seen]
        if idle:
            mods = dict(self.model.named_modules())
            mha = [n for n in idle if n.rsplit(".", 1)[-1] == "out_proj"
                   and isinstance(mods.get(n.rsplit(".", 1)[0] if "." in n else ""), nn.MultiheadAttention)]
            why = (" nn.MultiheadAttention uses its out_proj's weight through F.linear, so out_proj "
                   "never runs (its output is the MultiheadAttention's: include=('**.self_attn',) "
                   "watches it)." if mha else "")
            warnings.warn(
                f"thermo watches {len(idle)} module(s) whose forward never ran in the first "
                f"{len(rows)} steps, so they record nothing: {idle}. A module whose weight is used "
                f"directly (F.linear, a tied or shared weight) or that the forward skips never "
                f"fires.{why} exclude=({', '.join(repr(n) for n in idle[:3])}{', ...' if len(idle) > 3 else ''}) "
                "silences this.",
                stacklevel=4,
            )
        silent = [n or ROOT for n, *_ in self._attn_plan if (n or ROOT) not in seen]
        if silent:
            warnings.warn(
                f"thermo: attention layers {silent} computed attention in the first forward but no "
                f"attention logits were seen in {len(rows)} steps (sampled steps are every "
                f"{self.config.attn_every}); their attn_* keys stay empty.",
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
        if self._finder is not None:
            self._finder.remove()
            self._finder = None

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
                if sys.exc_info()[0] is None:  # closed by the loop's end, not by an exception
                    self.store.set_meta("closed", {"step": self.step_count - 1, "attempt": self.attempt,
                                                   "time": time.time()})
                self.store.close()

    def __enter__(self) -> Thermometer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def attention_head_max(self) -> dict[str, torch.Tensor]:
        """The current step's per-head max attention logit of each attention layer recorded per
        head (``attn_per_head=True``): layer name -> live (heads,) view of the device
        accumulator. Valid from the forward until `step` moves it to the ring and resets it;
        -inf where nothing exact was computed (an unsampled step, see ``attn_every``, or a
        layer that did not run). Reading it is a host sync; QK-Clip uses it on the device."""
        return {name: self.buffer.view(slots["attn_max.heads"], heads)
                for name, _mod, slots, heads in self._attn_plan if heads}


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device if t.device.type != "meta" else torch.device("cpu")
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_scalars(**values) -> None:
    """A tensor passed as a per-step value must hold one number (its shape is metadata: no sync)."""
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            fix = ("reduce it first, e.g. loss.mean() (the loss the optimizer steps on)" if name == "loss"
                   else f"reduce it to one number first, e.g. {name}.mean() or {name}.max()")
            raise ValueError(f"Thermometer.step: {name} must be a scalar, got a tensor of shape "
                             f"{tuple(value.shape)}; {fix}")


def _as_device_scalar(value: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().float().reshape(())


def _event_done(event) -> bool:
    return event is None or event.query()


def _reset_stale_compiles() -> None:
    """Hooks added to a module torch.compile already traced never fire (hook guards are skipped),
    silently. If dynamo holds compiled code of the user's, drop it so the next call retraces with
    the hooks. Code torch compiles for itself (flex_attention's eager path) is not the user's."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    try:
        from torch._dynamo import convert_frame

        codes = (ref() for ref in convert_frame.input_codes.seen)
        compiled = any(c is not None and not c.co_filename.startswith(torch_dir) for c in codes)
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

