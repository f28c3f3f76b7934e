"""Training scenarios for the detector's tests and benchmark: healthy, poisoned, high learning rate.

Each scenario trains a small byte-level `thermo.gpt.GPT` on the standard library's own sources
(`thermo.corpus`), records every step through a real `thermo.Thermometer` into a run directory,
and returns the ground truth the detector is judged against.

The natural divergence (``high_lr``) follows what issue 3 measured: in fp32 a high learning rate
does not make the loss non-finite, it makes the attention logits (and the residual stream)
explode while the loss sits on a worse plateau. Under fp16 autocast those values overflow 65504
and the loss goes NaN. Here, with LR 0.5 after a 200-step warm-up, the residual stream and the
attention logits climb from step ~10 (logits reach 1e3-9e3), and the NaN comes between steps
~150 and ~300, when an fp16 projection output (attention or MLP ``c_proj``) passes 65504.
Choices that make this happen on a CPU:

* ``attn_impl="explicit"`` (``softmax(q @ kᵀ * scale)``, like nanoGPT's non-flash path or Hugging
  Face's eager attention): the logits exist in fp16. The CPU ``scaled_dot_product_attention``
  kernel accumulates them in fp32 under fp16 autocast; with it, a d=64 model at LR 0.1 held
  logits of 7e3 for 200 steps without a NaN.
* fp16 CPU autocast (torch 2.13 supports it; about 5-10x slower than fp32 here, because CPU
  fp16 matmuls have no fast kernel), hence the small model.

"Diverged" (used for lead times): the first step whose loss is non-finite or exceeds twice the
running minimum of the finite losses before it, after `DIVERGED_WARMUP` steps (the first steps
fall from ln(256) = 5.5 and would count otherwise).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from thermo import Thermometer
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.gpt import GPT, GPTConfig

DIVERGED_WARMUP = 20
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Scenario:
    """One training run to record.

    Attributes:
        name: ``"healthy"``, ``"healthy_d128"``, ``"poison"`` or ``"high_lr"`` (what the run
            is meant to show).
        seed: seeds the model init and the batch order.
        steps: optimizer steps to run (the run stops early at the first non-finite loss plus
            `after_nonfinite` steps: nothing useful is learned from a NaN model).
        model: the GPT's shape.
        batch_size: samples per step.
        lr: peak learning rate (AdamW, no gradient clipping).
        warmup: steps of linear learning-rate warm-up from lr/warmup to lr.
        dtype: autocast dtype (``"float32"`` = no autocast).
        poison_steps: steps whose batch is poisoned: its loss, hence its gradient, is multiplied
            by `poison_scale`. The recorded loss is the poisoned one (what the loop computed).
        poison_scale: the factor.
        flush_every: thermometer flush period.
        attn_every: thermometer exact attention-logit sampling period.
        after_nonfinite: steps still recorded after the first non-finite loss.
        stop_at_diverged: stop at the "diverged" step (see the module docstring) instead.
    """

    name: str
    seed: int = 0
    steps: int = 300
    model: GPTConfig = field(
        default_factory=lambda: GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, attn_impl="explicit")
    )
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 50
    dtype: str = "float16"
    poison_steps: tuple[int, ...] = ()
    poison_scale: float = 1e4
    flush_every: int = 10
    attn_every: int = 10
    after_nonfinite: int = 3
    stop_at_diverged: bool = False

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"Scenario.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.steps < 1 or self.warmup < 0 or self.batch_size < 1:
            raise ValueError(f"Scenario needs steps >= 1, warmup >= 0, batch_size >= 1, got {self}")


def healthy(seed: int, steps: int = 300, **kw) -> Scenario:
    return Scenario("healthy", seed=seed, steps=steps, **kw)


def poison(seed: int, steps: int = 300, at: int | None = None, n: int = 3, **kw) -> Scenario:
    """Poison `n` consecutive batches starting at step `at` (default: 60% into the run)."""
    at = int(steps * 0.6) if at is None else at
    return Scenario("poison", seed=seed, steps=steps, poison_steps=tuple(range(at, at + n)), **kw)


def high_lr(seed: int, steps: int = 300, lr: float = 0.5, warmup: int = 200, **kw) -> Scenario:
    """A learning rate ~150x the healthy one, reached by a linear warm-up: the attention logits
    start climbing once it passes ~0.05 and fp16 overflows within a few hundred steps."""
    return Scenario("high_lr", seed=seed, steps=steps, lr=lr, warmup=warmup, **kw)


def healthy_d128(seed: int, steps: int = 600, **kw) -> Scenario:
    """The issue's reference model (4 layers, d=128, 128 tokens, sdpa) at LR 3e-3 in fp32: its
    attention logits roughly double between steps 100 and 200 (19 at step 50, 48 at 200), the
    healthy growth the growth rule must not take for divergence. ~0.2 s/step on one CPU core."""
    return Scenario("healthy_d128", seed=seed, steps=steps, model=GPTConfig(), dtype="float32", **kw)


@dataclass
class Outcome:
    """What a recorded run did: the truth a detector is scored against."""

    scenario: Scenario
    run_dir: Path
    losses: list[float]
    first_nonfinite: int | None
    diverged: int | None  # see the module docstring
    records: list = field(default_factory=list)  # StepRecords in the order `therm.step` returned them
    online: list = field(default_factory=list)  # (step, Verdict) from a detector fed live, if any


def diverged_step(losses: list[float], warmup: int = DIVERGED_WARMUP) -> int | None:
    """First step (index) with a non-finite loss, or, after `warmup`, a loss above twice the
    running minimum of the finite losses before it."""
    run_min = math.inf
    for step, loss in enumerate(losses):
        if not math.isfinite(loss):
            return step
        if step >= warmup and loss > 2.0 * run_min:
            return step
        run_min = min(run_min, loss)
    return None


@functools.lru_cache(maxsize=4)
def _dataset(block_size: int) -> TokenDataset:
    return TokenDataset(stdlib_bytes(2_000_000), block_size)


def run(scenario: Scenario, run_dir: str | Path, live=None) -> Outcome:
    """Train `scenario`, recording every step into `run_dir` (a fresh directory).

    Args:
        scenario: what to train.
        run_dir: the run directory the thermometer writes.
        live: optional callable ``live(records)`` called with the records each `therm.step`
            returns (e.g. a `Detector.update`); non-None results are kept in ``Outcome.online``.

    Returns:
        The `Outcome`.
    """
    sc = scenario
    torch.manual_seed(sc.seed)
    ds = _dataset(sc.model.block_size)
    model = GPT(sc.model)
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(sc.seed)
    dtype = _DTYPES[sc.dtype]
    poisoned = set(sc.poison_steps)
    out = Outcome(sc, Path(run_dir), [], None, None)
    therm = Thermometer(model, run_dir=run_dir, flush_every=sc.flush_every, attn_every=sc.attn_every)
    try:
        for step in range(sc.steps):
            for group in opt.param_groups:
                group["lr"] = sc.lr * min(1.0, (step + 1) / sc.warmup) if sc.warmup else sc.lr
            x, y = ds.batch(rng.integers(0, len(ds), sc.batch_size))
            with torch.autocast("cpu", dtype=dtype, enabled=sc.dtype != "float32"):
                _, loss = model(x, y)
            if step in poisoned:
                loss = loss * sc.poison_scale
            loss.backward()
            _collect(out, therm.step(loss), live)
            opt.step()
            opt.zero_grad(set_to_none=True)
            # note: host sync, fine in a benchmark: stop soon after the model is NaN.
            out.losses.append(float(loss.detach()))
            if out.first_nonfinite is None and not math.isfinite(out.losses[-1]):
                out.first_nonfinite = step
            if out.first_nonfinite is not None and step >= out.first_nonfinite + sc.after_nonfinite:
                break
            if sc.stop_at_diverged and diverged_step(out.losses) is not None:
                break
        _collect(out, therm.flush(), live)
    finally:
        therm.close()
    out.diverged = diverged_step(out.losses)
    return out


def _collect(out: Outcome, records, live) -> None:
    out.records.extend(records)
    if live is not None and records:
        verdict = live(records)
        if verdict is not None:
            out.online.append(verdict)
