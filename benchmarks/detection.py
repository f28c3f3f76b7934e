"""Detection benchmark: thermo's detector against the rules peers ship, on the same recorded runs.

    python benchmarks/detection.py --seeds 0 1 2 3 4 --steps 300 --out detection.json

For every seed it trains three scenarios of `benchmarks/scenarios.py` (a small byte-level GPT
under fp16 autocast on the standard library's sources), recording each through a real
`thermo.Thermometer`:

* ``healthy``: LR 3e-3 (50 warm-up steps). Any detection is a false alarm.
* ``poison``: the same run with 3 consecutive batches (from 60% of the run) whose loss, hence
  gradient, is scaled by 1e4. A detection before the first poisoned step is a false alarm; the
  latency is the detection step minus that step.
* ``high_lr``: LR 0.5 reached after 200 warm-up steps. The residual stream and the attention
  logits climb from step ~10; the loss jumps above twice its minimum now and then and fp16
  eventually overflows (NaN). The lead time is the "diverged" step (the loss first non-finite or
  above 2x its running minimum after step 20, see `scenarios.diverged_step`) minus the detection
  step; runs that do not diverge within ``--steps`` are left out of it.
* ``healthy_d128`` (opt-in, slow): the issue's 4-layer d=128 model at LR 3e-3 in fp32, whose
  attention logits double between steps 100 and 200. Any detection is a false alarm.

Then it replays each run through thermo's `Detector` (offline, `detect_run`; the live verdict is
checked equal) and through the baselines below, and prints one table.

Tuning and reporting use different seeds: the detector's defaults were chosen on seeds 100-104
(``--seeds 100 101 102 103 104``) and on two hand runs of the d=128 model (600 healthy steps at
LR 3e-3 and 1e-3), which set the growth floor; the README reports seeds 0-4.

With ``--guard`` each scenario is also trained by the reference loop (`thermo.train_gpt`) under the
`Guard`, set up like the scenario, in each remedy variant (``--guard-variants``): ``window`` (the
remedy before cause attribution, ``--no-replay``: blacklist every sample of the suspect steps),
``replay`` (the default: replay, blacklist only samples found toxic) and ``replay+qkclip`` (also
QK-Clip, high-LR only). In the guarded poison runs only the first ``--poison-per-batch`` samples of
each poisoned batch are toxic (the poison follows the samples), so a remedy that blacklists whole
batches is seen to. A second table gives, per variant: rollbacks on healthy runs; for poison, the
toxic samples blacklisted (recall), innocent samples blacklisted per toxic one, steps redone,
seconds spent replaying and the final-loss gap to a clean run that never saw the blacklisted
samples; for high LR, runs finished and the share of the dataset left blacklisted.
``--guard-only`` skips the detector comparison.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks import scenarios  # noqa: E402
from thermo.detector import Detector, DetectorConfig, detect_run  # noqa: E402
from thermo.store import StepRecord, Store  # noqa: E402

# -- the rules peers ship, with their published defaults ------------------------------------
#
# Each baseline sees one StepRecord at a time (in step order) and says whether it would have
# stopped (or, for the step-skipping rules, skipped) at that step. All of them also fire on a
# non-finite loss: every one of these frameworks pairs its rule with a NaN check (Megatron's
# --check-for-nan-in-loss-and-grad, Lightning's finite_only...); without it the comparison would
# only measure who forgot NaNs.


class Baseline:
    name = "baseline"

    def fires(self, rec: StepRecord) -> bool:
        loss = rec.scalars.get("loss", math.nan)
        if not math.isfinite(loss):
            return True
        return self._rule(rec, loss)

    def _rule(self, rec: StepRecord, loss: float) -> bool:
        raise NotImplementedError


class Megatron(Baseline):
    """``--check-for-spiky-loss``: loss >= 10x the largest |loss| of the first 100 values.

    Source: NVIDIA/Megatron-LM, ``megatron/core/rerun_state_machine.py``
    ``RerunStateMachine.is_unexpectedly_large(threshold, num_samples=100)``, called from
    ``pretrain_gpt.py``'s ``loss_func`` with ``SPIKY_LOSS_FACTOR = 10``. NaN/inf are ignored
    there (left to the NaN check).
    """

    name = "Megatron spiky-loss (10x max of first 100)"

    def __init__(self, factor: float = 10.0, num_samples: int = 100):
        self.factor, self.num_samples = factor, num_samples
        self.count, self.max = 0, 0.0

    def _rule(self, rec, loss):
        value = abs(loss)
        if self.count < self.num_samples:
            self.count += 1
            self.max = max(self.max, value)
            return False
        return value >= self.max * self.factor


class LLMFoundry(Baseline):
    """``KillLossSpike``: loss >= 2x the mean of a full 100-loss window for more than
    `patience` (4) consecutive steps; or, after 2 windows, half the window above loss_cap (10).

    Source: mosaicml/llm-foundry, ``llmfoundry/callbacks/kill_loss_spike_callback.py``
    (defaults patience=4, outlier_multiplier=2, window_size=100, loss_cap=10). Every loss,
    outliers included, enters the window.
    """

    name = "llm-foundry KillLossSpike (2x mean/100, patience 4)"

    def __init__(self, patience=4, outlier_multiplier=2.0, window_size=100, loss_cap=10.0):
        self.patience, self.mult, self.cap = patience, outlier_multiplier, loss_cap
        self.window: deque[float] = deque(maxlen=window_size)
        self.counter, self.batches = 0, 0

    def _rule(self, rec, loss):
        fired = False
        self.batches += 1
        if len(self.window) == self.window.maxlen:
            avg = float(np.mean(self.window))
            if loss >= avg * self.mult:
                self.counter += 1
                fired = self.counter > self.patience
            else:
                self.counter = 0
            # The "persistently high loss" check runs whenever the spike check did not fire.
            fired = fired or (self.batches >= 2 * self.window.maxlen and (
                sum(v > self.cap for v in self.window) >= self.window.maxlen / 2
            ))
        self.window.append(loss)
        return fired


class OLMoCore(Baseline):
    """``SkipStepOptimizer``: skip when |loss - mean| or |grad_norm - mean| exceeds 6 std over
    the previous up-to-128 values, once at least max(20, 128 // 2) values were seen.

    Source: allenai/OLMo-core, ``src/olmo_core/optim/skip_step_optimizer.py``
    (rolling_interval_length=128, sigma_factor=6; skipped values still enter the history).
    """

    name = "OLMo-core skip step (6 sigma / 128)"

    def __init__(self, window=128, sigma=6.0):
        self.sigma = sigma
        self.losses: deque[float] = deque(maxlen=window + 1)
        self.norms: deque[float] = deque(maxlen=window + 1)
        self.min_len = max(20, window // 2)

    def _rule(self, rec, loss):
        self.losses.append(loss)
        gn = rec.scalars.get("grad_norm")
        if gn is not None:
            self.norms.append(gn)
        if len(self.losses) < self.min_len:
            return False
        if _z(self.losses) > self.sigma:
            return True
        return bool(self.norms) and len(self.norms) > 2 and _z(self.norms) > self.sigma


def _z(values: deque) -> float:
    arr = np.asarray(values, dtype=np.float64)
    prev = arr[:-1]
    std = prev.std(ddof=1)  # torch.std_mean is unbiased
    z = abs(arr[-1] - prev.mean()) / std
    # NaN z (inf or NaN in the history) fails OLMo's `z <= sigma` test: the step is skipped.
    return math.inf if math.isnan(z) else z


class Lightning(Baseline):
    """``SpikeDetection``: after `warmup` (1) batches, a loss that did not improve on the last
    one and is at least rtol (2) x the running mean of the last 10 losses away from it.

    Source: Lightning-AI/pytorch-lightning, ``src/lightning/fabric/utilities/spike.py``
    (mode="min", window=10, warmup=1, atol=None, rtol=2.0, finite_only=True).
    """

    name = "Lightning SpikeDetection (mean/10, rtol 2)"

    def __init__(self, window=10, warmup=1, rtol=2.0):
        self.window: deque[float] = deque(maxlen=window)
        self.warmup, self.rtol = warmup, rtol
        self.last, self.batch_idx = 0.0, 0

    def _rule(self, rec, loss):
        idx, self.batch_idx = self.batch_idx, self.batch_idx + 1
        spike = False
        if idx >= self.warmup and self.window:
            running = float(np.mean(self.window))
            spike = loss - self.last > 0 and abs(loss - running) >= abs(self.rtol * running)
        if not spike:
            self.window.append(loss)
            self.last = loss
        return spike


class ZClip(Baseline):
    """ZClip's spike test on the gradient norm: z = (g - EMA mean) / EMA std > 2.5, after 25
    warm-up norms; the EMAs (alpha 0.97) take the clipped norm on a spike.

    Source: bluorion-com/ZClip, ``zclip/zclip.py`` (alpha=0.97, z_thresh=2.5, warmup_steps=25,
    mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0). ZClip clips rather than
    stops; here a clip event counts as a detection.
    """

    name = "ZClip (z 2.5, EMA 0.97)"

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6):
        self.alpha, self.z_thresh, self.warmup, self.eps = alpha, z_thresh, warmup, eps
        self.buffer: list[float] = []
        self.mean = self.var = None

    def _rule(self, rec, loss):
        g = rec.scalars.get("grad_norm")
        if g is None:
            return False
        if not math.isfinite(g):
            return True
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return False
        std = self.var**0.5
        z = (g - self.mean) / (std + self.eps)
        spike = z > self.z_thresh
        if spike:
            g = self.mean + (self.z_thresh * std) / (z / self.z_thresh)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * g
        self.var = self.alpha * self.var + (1 - self.alpha) * (g - self.mean) ** 2
        return spike


BASELINES = (Megatron, LLMFoundry, OLMoCore, Lightning, ZClip)

# -- the runs and the table --------------------------------------------------------------------

THERMO = {
    "thermo (dtype=float16)": DetectorConfig(dtype="float16"),
    "thermo (no dtype)": DetectorConfig(),
    "thermo, loss/grad rules only": DetectorConfig(growth_stats=()),
}
BUILD = {"healthy": scenarios.healthy, "poison": scenarios.poison, "high_lr": scenarios.high_lr,
         "healthy_d128": scenarios.healthy_d128}


def record_runs(kinds, seeds, steps: dict[str, int], runs_dir: Path, reuse: bool) -> list[dict]:
    """Train (or reuse) every scenario x seed (`steps`: per scenario); returns their truth."""
    truths = []
    for kind in kinds:
        for seed in seeds:
            sc = BUILD[kind](seed, steps[kind])
            run_dir = runs_dir / f"{kind}-s{seed}-n{sc.steps}"
            truth_file = run_dir / "truth.json"
            if reuse and truth_file.is_file():
                truths.append(json.loads(truth_file.read_text()))
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            live = Detector(THERMO["thermo (dtype=float16)"])
            t0 = time.time()
            out = scenarios.run(sc, run_dir, live=live.update)
            truth = {
                "kind": kind, "seed": seed, "steps": sc.steps, "run_dir": str(run_dir),
                "first_nonfinite": out.first_nonfinite, "diverged": out.diverged,
                "poison": min(sc.poison_steps) if sc.poison_steps else None,
                "online": [v.to_dict() for v in out.online], "online_config": repr(live.config),
                "seconds": time.time() - t0,
            }
            truth_file.write_text(json.dumps(truth))
            truths.append(truth)
            print(f"  {kind:8s} seed {seed}: {len(out.losses)} steps in {truth['seconds']:.0f}s, "
                  f"first non-finite {out.first_nonfinite}, diverged {out.diverged}", flush=True)
    return truths


# -- what the Guard makes of it: rollbacks, steps lost, final-loss gap ---------------------------


def _guard_args(sc: scenarios.Scenario, run_dir: Path, extra: tuple[str, ...] = (), per_batch: int = 0) -> list[str]:
    """The reference loop (thermo.train_gpt) set up like scenario `sc`: same model, dtype, batch,
    data and LR (warm-up, then constant), with the Guard in charge."""
    m = sc.model
    dtype = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[sc.dtype]
    args = ["--run-dir", str(run_dir), "--steps", str(sc.steps), "--seed", str(sc.seed),
            "--n-layer", str(m.n_layer), "--n-head", str(m.n_head), "--n-embd", str(m.n_embd),
            "--block-size", str(m.block_size), "--attn-impl", m.attn_impl, "--batch-size", str(sc.batch_size),
            "--lr", str(sc.lr), "--min-lr", str(sc.lr), "--warmup", str(max(1, sc.warmup)), "--dtype", dtype,
            "--flush-every", str(sc.flush_every), "--attn-every", str(sc.attn_every),
            "--checkpoint-every", "20", "--good-after", "20", "--data-bytes", "2000000", "--quiet", *extra]
    if sc.poison_steps:
        args += ["--poison-steps", f"{min(sc.poison_steps)}-{max(sc.poison_steps)}",
                 "--poison-per-batch", str(per_batch)]
    return args


# The remedies compared: name -> (train_gpt options, the scenarios it runs).
GUARD_VARIANTS = {
    # The remedy before cause attribution, without the blacklist cap (as it was).
    "window": (("--no-replay", "--max-blacklist-fraction", "1"), ("poison", "high_lr")),
    "replay": ((), ("healthy", "poison", "high_lr")),
    "replay+qkclip": (("--qk-clip", "100"), ("high_lr",)),
}


def recover_runs(kinds, seeds, steps: dict[str, int], runs_dir: Path, reuse: bool, variants=("window", "replay"),
                 per_batch: int = 2) -> list[dict]:
    """Train each scenario under the Guard in each remedy variant; for poison, also the clean run
    that never saw the samples the Guard blacklisted. One row per run, for the guard table."""
    from thermo.corpus import TokenDataset, stdlib_bytes
    from thermo.data import Blacklist
    from thermo.guard import DivergenceError
    from thermo.store import Store
    from thermo.train_gpt import parse_args, poison_ids, train

    rows = []
    sizes: dict[int, int] = {}  # block size -> samples in the loop's dataset
    # Seed by seed, so that an interrupted benchmark (--reuse picks up) has every variant of the
    # seeds it finished.
    plan = [(seed, variant, kind) for seed in seeds for variant in variants for kind in kinds
            if kind in GUARD_VARIANTS[variant][1]]
    for seed, variant, kind in plan:
        extra = GUARD_VARIANTS[variant][0]
        sc = BUILD[kind](seed, steps[kind])
        base = runs_dir / f"guard-{variant}-{kind}-s{seed}-n{sc.steps}"
        done = base / "recovery.json"
        if reuse and done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        shutil.rmtree(base, ignore_errors=True)
        row = {"scenario": f"guard_{kind}", "seed": seed, "detector": variant}
        args = parse_args(_guard_args(sc, base / "guarded", extra, per_batch))
        t0 = time.time()
        try:
            s = train(args)
            row.update(finished=True, steps_lost=s.steps_lost, final=s.final_loss)
        except DivergenceError:
            row.update(finished=False, steps_lost=None, final=None)
        with Store(base / "guarded", readonly=True) as store:
            events = store.events()
        rb = [e for e in events[events.kind == "rollback"]["data"]]
        row["rollbacks"] = len(rb)
        row["replay_seconds"] = sum((e.get("replay") or {}).get("seconds", 0.0) for e in rb)
        blacklisted = set(Blacklist.load(base / "guarded").ids)
        if sc.model.block_size not in sizes:  # the loop's data (read once per sequence length)
            sizes[sc.model.block_size] = len(TokenDataset(stdlib_bytes(2_000_000), sc.model.block_size))
        n = sizes[sc.model.block_size]
        row["blacklisted"] = len(blacklisted)
        # What the rollbacks blacklisted, before a give-up took back the unproven ids.
        by_rollbacks = {i for e in rb for i in e.get("blacklisted", [])}
        row["blacklisted_share"] = len(by_rollbacks | blacklisted) / n
        if kind == "poison":
            toxic = poison_ids(args, n)
            row["toxic"] = len(toxic)
            row["recall"] = len(blacklisted & toxic) / len(toxic)
            row["innocent_per_toxic"] = len(blacklisted - toxic) / len(toxic)
        if kind == "poison" and row["finished"]:
            (base / "clean").mkdir(parents=True)
            Blacklist(base / "clean").add(blacklisted, reason="the samples the guarded run blacklisted")
            clean = train(parse_args(_guard_args(replace(sc, poison_steps=()), base / "clean")))
            row["gap"] = abs(row["final"] - clean.final_loss) / clean.final_loss
        row["seconds"] = time.time() - t0
        done.write_text(json.dumps(row))
        rows.append(row)
        print(f"  guard {variant:13s} {kind:8s} seed {seed}: {row}", flush=True)
    return rows


def evaluate(truths: list[dict]) -> list[dict]:
    """One row per (run, detector): where it fired, against the run's truth."""
    rows = []
    for truth in truths:
        with Store(truth["run_dir"], readonly=True) as store:
            records = [r for r in store.records(effective=False) if r.attempt == 0]
            for name, cfg in THERMO.items():
                verdicts = detect_run(store, cfg)
                # The live detector ran with this config while recording (unless the run was
                # reused after the config changed): offline replay must give its verdicts.
                live = name == "thermo (dtype=float16)" and truth["online_config"] == repr(cfg)
                if live and [_decision(v.to_dict()) for v in verdicts] != list(map(_decision, truth["online"])):
                    raise AssertionError(f"offline verdicts differ from the live ones in {truth['run_dir']}")
                v = verdicts[0] if verdicts else None
                rows.append(_row(truth, name, v.detection_step if v else None, v.onset_step if v else None,
                                 f"{v.kind}:{v.signal}" if v else ""))
        for cls in BASELINES:
            det = cls()
            fired = next((r.step for r in records if det.fires(r)), None)
            rows.append(_row(truth, det.name, fired, None, ""))
    return rows


def _decision(v: dict) -> tuple:
    return v["kind"], v["signal"], v["layer"], v["onset_step"], v["detection_step"]


def _row(truth: dict, detector: str, step: int | None, onset: int | None, what: str) -> dict:
    kind = truth["kind"]
    event = {"poison": truth["poison"], "high_lr": truth["diverged"]}.get(kind)
    false_alarm = step is not None and (kind.startswith("healthy") or (kind == "poison" and step < event))
    return {
        "scenario": kind, "seed": truth["seed"], "detector": detector, "detection": step,
        "onset": onset, "rule": what, "event": event, "false_alarm": false_alarm,
        # lead: steps before the event (negative: after it); poison latency = -lead
        "lead": None if step is None or event is None or false_alarm else event - step,
        "onset_lead": None if onset is None or event is None or false_alarm else event - onset,
    }


@dataclass(frozen=True)
class Column:
    header: str
    compute: Callable[[list[dict]], str]  # the rows of one detector -> cell


def _of(rows, kind):
    return [r for r in rows if r["scenario"] == kind]


def _frac(rows, pred, among=lambda r: True) -> str:
    pool = [r for r in rows if among(r)]
    return f"{sum(map(pred, pool))}/{len(pool)}" if pool else "-"


def _median(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{statistics.median(values):g} [{lo}..{hi}]" if lo != hi else f"{lo}"


def _pct(values, low: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    edge = f"min {100 * min(values):.2f}%" if low else f"max {100 * max(values):.2f}%"
    return f"{100 * statistics.median(values):.2f}% [{edge}]"


COLUMNS = [
    Column("healthy FA", lambda rs: _frac(_of(rs, "healthy"), lambda r: r["false_alarm"])),
    Column("poison detected", lambda rs: _frac(_of(rs, "poison"), lambda r: r["lead"] is not None)),
    Column("poison FA", lambda rs: _frac(_of(rs, "poison"), lambda r: r["false_alarm"])),
    Column("poison latency", lambda rs: _median(-r["lead"] for r in _of(rs, "poison") if r["lead"] is not None)),
    Column("high-LR detected", lambda rs: _frac(_of(rs, "high_lr"), lambda r: r["lead"] is not None,
                                                among=lambda r: r["event"] is not None)),
    Column("high-LR lead", lambda rs: _median(r["lead"] for r in _of(rs, "high_lr"))),
    Column("high-LR onset lead", lambda rs: _median(r["onset_lead"] for r in _of(rs, "high_lr"))),
    Column("d128 healthy FA", lambda rs: _frac(_of(rs, "healthy_d128"), lambda r: r["false_alarm"])),
]

# The Guard acting on thermo's verdicts (--guard): reference loop, same scenarios, per remedy.
GUARD_COLUMNS = [
    Column("healthy rollbacks", lambda rs: _median(r["rollbacks"] for r in _of(rs, "guard_healthy"))),
    Column("poison toxic recall", lambda rs: _pct([r.get("recall") for r in _of(rs, "guard_poison")], low=True)),
    Column("innocent per toxic", lambda rs: _median(round(r["innocent_per_toxic"], 2)
                                                    for r in _of(rs, "guard_poison") if "innocent_per_toxic" in r)),
    Column("poison steps redone", lambda rs: _median(r["steps_lost"] for r in _of(rs, "guard_poison"))),
    Column("poison replay s", lambda rs: _median(round(r["replay_seconds"], 1) for r in _of(rs, "guard_poison"))),
    Column("poison loss gap", lambda rs: _pct(r.get("gap") for r in _of(rs, "guard_poison"))),
    Column("high-LR finished", lambda rs: _frac(_of(rs, "guard_high_lr"), lambda r: r["finished"])),
    Column("high-LR rollbacks", lambda rs: _median(r["rollbacks"] for r in _of(rs, "guard_high_lr"))),
    Column("high-LR final loss", lambda rs: _median(round(r["final"], 2) for r in _of(rs, "guard_high_lr")
                                                    if r.get("final") is not None)),
    Column("high-LR data blacklisted", lambda rs: _pct([r.get("blacklisted_share") for r in _of(rs, "guard_high_lr")])),
]


def table(rows: list[dict], columns: list[Column] = COLUMNS, first: str = "detector") -> str:
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    cells = [[first] + [c.header for c in columns]]
    for d in detectors:
        mine = [r for r in rows if r["detector"] == d]
        cells.append([d] + [c.compute(mine) for c in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--scenarios", nargs="+", default=["healthy", "poison", "high_lr"], choices=list(BUILD),
                   help="healthy_d128 (the issue's 4-layer d=128 model in fp32) is slow: opt in")
    p.add_argument("--d128-steps", type=int, default=600, help="steps of the healthy_d128 runs")
    p.add_argument("--out", type=Path, default=None, help="write rows as JSON (and .csv next to it)")
    p.add_argument("--runs-dir", type=Path, default=None, help="keep run directories here")
    p.add_argument("--reuse", action="store_true", help="reuse runs already in --runs-dir")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fp16 CPU runs are slow)")
    p.add_argument("--guard", action="store_true",
                   help="also train each scenario under the Guard (and poison's clean twin), per remedy variant")
    p.add_argument("--guard-only", action="store_true", help="only the Guard runs (implies --guard)")
    p.add_argument("--guard-variants", nargs="+", default=list(GUARD_VARIANTS), choices=list(GUARD_VARIANTS))
    p.add_argument("--poison-per-batch", type=int, default=2,
                   help="toxic samples per poisoned batch in the guarded poison runs")
    args = p.parse_args(argv)
    args.guard = args.guard or args.guard_only
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone()
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="thermo-detection-"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        steps = {kind: args.d128_steps if kind == "healthy_d128" else args.steps for kind in BUILD}
        rows, guard_rows = [], []
        if not args.guard_only:
            truths = record_runs(args.scenarios, args.seeds, steps, runs_dir, args.reuse)
            rows = evaluate(truths)
        if args.guard:
            kinds = [k for k in args.scenarios if k in ("healthy", "poison", "high_lr")]
            guard_rows = recover_runs(kinds, args.seeds, steps, runs_dir, args.reuse, args.guard_variants,
                                      args.poison_per_batch)
    finally:
        if args.runs_dir is None:
            shutil.rmtree(runs_dir, ignore_errors=True)
    print(f"\nthermo detection benchmark, {started:%Y-%m-%d %H:%M %Z}; {machine()}")
    print(f"command: python benchmarks/detection.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"seeds {args.seeds}, {args.steps} steps; GPT {asdict(scenarios.Scenario('x').model)}, fp16 autocast")
    if "healthy_d128" in args.scenarios:
        print(f"healthy_d128: GPT {asdict(scenarios.healthy_d128(0).model)}, fp32, {args.d128_steps} steps")
    print("lead = diverged step - detection step (median [min..max]); latency = detection - first poisoned step\n")
    if rows:
        print(table(rows))
    if guard_rows:
        print(f"\nthe Guard's remedies (reference loop; poison: {args.poison_per_batch} toxic samples in each of the "
              "3 poisoned batches; median [min..max] over seeds)\n")
        print(table(guard_rows, GUARD_COLUMNS, first="remedy"))
    rows = rows + guard_rows
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": started.isoformat(), "machine": machine(),
                                        "seeds": args.seeds, "steps": args.steps, "rows": rows}, indent=1))
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
