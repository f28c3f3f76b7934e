"""Tests for thermo/detector/: each rule alone on fixed sequences, streaming invariances, state
round trips, offline replay, and real recorded runs (poisoned, healthy, fp16 high learning rate)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import thermo
from thermo.detector import Detector, DetectorConfig, SpikeRule, Verdict, detect_run
from thermo.store import StepRecord, Store

ATTN = ("h.1.attn", "attn_max")
ACT = ("h.0.mlp.c_fc", "act_max")


def _scenarios():
    # benchmarks/ is not on sys.path: load the shared scenario module by path (once).
    name = "_thermo_bench_scenarios"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / "scenarios.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(mod)
    return sys.modules[name]


def series(n: int, seed: int = 0, loss: float = 3.0, grad_norm: float = 1.0, attn: float = 20.0,
           act: float = 50.0, attn_every: int = 10) -> list[StepRecord]:
    """A healthy run: log-normal noise around fixed levels; attn_max on sampled steps only."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        a, b, c, d = rng.standard_normal(4)
        rec = StepRecord(step=t, scalars={"loss": loss * math.exp(0.05 * a),
                                          "grad_norm": grad_norm * math.exp(0.3 * b),
                                          "grad_nonfinite": 0.0, "wall_time": 1e9 + t})
        rec.layers[ACT] = act * math.exp(0.1 * c)
        if t % attn_every == 0:
            rec.layers[ATTN] = attn * math.exp(0.1 * d)
        out.append(rec)
    return out


def first(records, config=None) -> Verdict | None:
    return Detector(config).update(records)


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("spikes", ("loss",)), ("spikes", (SpikeRule("loss"), SpikeRule("loss", z=3))), ("spike_window", 1), ("spike_min_window", 500), ("growth_factor", 0.5),
     ("overflow_fraction", 0.0), ("overflow_fraction", 1.5), ("dtype", "float64x"),
     ("dtype_max", -1.0), ("growth_stats", "attn_max"), ("growth_recent", 0), ("onset_z", math.nan), ("growth_quantile", 0.9)],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"DetectorConfig.{field}"):
        DetectorConfig(**{field: value})


@pytest.mark.parametrize("kw, field", [({"signal": ""}, "signal"), ({"signal": "loss", "z": -1.0}, "z"),
                                      ({"signal": "loss", "min_ratio": 0.5}, "min_ratio")])
def test_spike_rule_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=f"SpikeRule.{field}"):
        SpikeRule(**kw)


def test_config_dtype_limits():
    assert DetectorConfig().limit is None
    assert DetectorConfig(dtype="fp16").dtype == "float16"
    assert DetectorConfig(dtype="float16").limit == 65504.0
    assert DetectorConfig(dtype="bf16").limit > 3e38
    assert DetectorConfig(dtype="float16", dtype_max=1000.0).limit == 1000.0
    assert DetectorConfig(dtype=torch.float16).dtype == "float16"


# -- rules, one at a time ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("signal", ["loss", "grad_norm"])
def test_nonfinite_scalar_is_immediate(signal, bad):
    recs = series(30)
    recs[3].scalars[signal] = bad  # long before any warm-up ends
    v = first(recs)
    assert (v.kind, v.signal, v.layer, v.detection_step, v.onset_step) == ("nonfinite", signal, None, 3, 3)
    assert math.isnan(v.evidence["value"]) if math.isnan(bad) else v.evidence["value"] == bad


def test_grad_nonfinite_count():
    recs = series(30)
    recs[12].scalars["grad_nonfinite"] = 2.0
    v = first(recs)
    assert (v.kind, v.signal, v.detection_step, v.evidence["value"]) == ("nonfinite", "grad_nonfinite", 12, 2.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_layer_stat(bad):
    recs = series(30)
    recs[20].layers[ATTN] = bad
    recs[20].layers[("h.0.mlp.c_proj", "act_min")] = bad
    v = first(recs)
    # Several layers: the first in sorted order, and the count in the evidence.
    assert (v.kind, v.signal, v.layer, v.detection_step) == ("nonfinite", "act_min", "h.0.mlp.c_proj", 20)
    assert v.evidence["nonfinite_stats"] == 2.0


def test_nonfinite_rule_can_be_disabled():
    recs = series(30)
    recs[5].scalars["loss"] = math.nan
    assert first(recs, DetectorConfig(nonfinite=False)) is None


@pytest.mark.parametrize("signal", ["loss", "grad_norm"])
@pytest.mark.parametrize("factor, fires", [(1e4, True), (30.0, True), (1.2, False)])
def test_spike(signal, factor, fires):
    recs = series(200)
    recs[120].scalars[signal] *= factor
    v = first(recs)
    if not fires:
        assert v is None
        return
    assert (v.kind, v.signal, v.layer, v.onset_step, v.detection_step) == ("spike", signal, None, 120, 120)
    assert v.evidence["value"] == recs[120].scalars[signal]
    assert v.evidence["z"] > 8.0 and v.evidence["value"] > v.evidence["threshold"]
    assert f"{signal} spike at step 120 (onset 120)" in v.message


def test_spike_needs_warmup_and_window():
    recs = series(200)
    recs[10].scalars["loss"] *= 1e4  # before spike_warmup (20)
    assert first(recs) is None
    recs = series(200)
    recs[60].scalars["loss"] *= 1e4
    assert first(recs, DetectorConfig(spike_warmup=0, spike_min_window=80, spike_window=100)) is None
    assert first(recs).detection_step == 60


def test_spike_onset_walks_back():
    recs = series(200)
    for t in range(140, 146):  # above the healthy band (3σ), below the spike threshold
        recs[t].scalars["grad_norm"] = 5.0
    recs[146].scalars["grad_norm"] = 500.0
    v = first(recs)
    assert (v.signal, v.onset_step, v.detection_step) == ("grad_norm", 140, 146)


def _climb(recs, key, start, per_step):
    """Multiply `key` by per_step**(t - start) from `start` on (a sustained exponential climb)."""
    for rec in recs[start:]:
        if key in rec.layers:
            rec.layers[key] *= per_step ** (rec.step - start)


def _doubling(recs, key, start, every):
    """`key` exactly 20 until `start`, then doubling every `every` steps."""
    for rec in recs:
        if key in rec.layers:
            rec.layers[key] = 20.0 * 2.0 ** (max(0, rec.step - start) / every)


def test_growth_sustained_attention_logits():
    recs = series(400)
    _doubling(recs, ATTN, 250, 10)  # samples: 250: 20, 260: 40, 270: 80, 280: 160, 290: 320...
    v = first(recs)
    assert (v.kind, v.signal, v.layer) == ("growth", "attn_max", "h.1.attn")
    # Sampled every 10 steps: the 3 samples of the last 30 steps must all be >= 8x the
    # reference (20): 280, 290, 300. The onset is the first sample above 2x (> 40): 270.
    assert (v.onset_step, v.detection_step) == (270, 300)
    assert v.evidence["reference"] == pytest.approx(20.0) and v.evidence["ratio"] == pytest.approx(8.0)


def test_growth_picks_the_steepest_series_then_sorted_order():
    recs = series(400)
    _doubling(recs, ATTN, 250, 10)
    for rec in recs:  # a second layer growing exactly alike, and a third growing faster
        if ATTN in rec.layers:
            rec.layers[("h.0.attn", "attn_max")] = rec.layers[ATTN]
            rec.layers[("h.2.attn", "attn_max")] = 20.0 * 2.0 ** (max(0, rec.step - 250) / 9)
    assert first(recs).layer == "h.2.attn"
    for rec in recs:
        rec.layers.pop(("h.2.attn", "attn_max"), None)
    assert first(recs).layer == "h.0.attn"


def test_growth_ignores_transient_and_healthy_doubling():
    recs = series(400)
    recs[300].layers[ATTN] = 5000.0  # one wild sample is not sustained growth
    for rec in recs:  # healthy early growth: ~0.1 at init to 20 by step 100, x2 by step 200
        if ATTN in rec.layers:
            t = rec.step
            rec.layers[ATTN] *= 0.005 if t < 20 else min(1.0, t / 100) * (1 + min(1.0, max(0, t - 100) / 100))
    assert first(recs) is None


def test_growth_of_activation_extremes():
    recs = series(400, act=40.0)
    _climb(recs, ACT, 200, 1.02)
    v = first(recs)
    assert (v.kind, v.signal, v.layer) == ("growth", "act_max", "h.0.mlp.c_fc")
    assert v.onset_step < v.detection_step
    assert first(recs, DetectorConfig(growth_stats=("attn_max",))) is None


@pytest.mark.parametrize("dtype, fires", [("float16", True), ("bfloat16", False), (None, False)])
def test_overflow_near_dtype_limit(dtype, fires):
    recs = series(200)
    recs[150].layers[ACT] = 0.3 * 65504  # one step: not growth, just close to fp16's limit
    v = first(recs, DetectorConfig(dtype=dtype))
    if not fires:
        assert v is None
        return
    assert (v.kind, v.signal, v.layer, v.detection_step, v.onset_step) == ("overflow", "act_max", "h.0.mlp.c_fc", 150, 150)
    assert v.evidence["limit"] == 65504.0


def test_skipped_steps_escalate_and_stay_out_of_baselines():
    recs = series(200)
    for t in (100, 120, 130):
        recs[t].scalars.update(loss=math.nan, skipped=1.0)
    v = first(recs)
    # The guard skipped 100 and 120 on the device: tolerated (skip_tolerance=2); the third is not.
    assert (v.kind, v.signal, v.onset_step, v.detection_step) == ("nonfinite", "loss", 100, 130)
    assert v.evidence["skipped_recent"] == 3.0
    # Skipped spikes do not raise the baseline: 40 skipped 5x losses, then a 2x one still fires.
    recs = series(200)
    for t in range(60, 100):
        recs[t].scalars.update(loss=15.0, skipped=1.0)
    recs[150].scalars["loss"] = 6.0
    v = first(recs, DetectorConfig(skip_tolerance=1000))
    assert (v.signal, v.detection_step) == ("loss", 150)
    assert 2.8 < v.evidence["baseline"] < 3.2


def test_an_earlier_harmless_skip_does_not_drag_the_onset_back():
    # A skip at 60 (harmless: its update never happened), then three in a row at 105-107.
    recs = series(200)
    for t in (60, 105, 106, 107):
        recs[t].scalars.update(grad_norm=30.0, skipped=1.0)
    v = first(recs)
    assert (v.onset_step, v.detection_step) == (105, 106)  # the 60 still counts towards the tolerance
    assert "(onset 105)" in v.message and "(onset 60)" not in v.message
    # Skips that follow each other within skip_cluster_gap are one episode: its start is the onset.
    v = first(recs, DetectorConfig(skip_cluster_gap=50))
    assert v.onset_step == 60 and "(onset 60)" in v.message


# -- streaming ---------------------------------------------------------------------------------


def _sick():
    recs = series(400)
    _doubling(recs, ATTN, 250, 10)
    return recs


@pytest.mark.parametrize("chunk", [1, 7, 10, 400])
def test_same_verdict_however_records_are_batched(chunk):
    recs = _sick()
    det, got = Detector(), []
    for i in range(0, len(recs), chunk):
        v = det.update(recs[i : i + chunk])
        if v is not None:
            got.append(v)
    assert got == [first(recs)] and got[0].detection_step == 300


def test_latch_and_rewind():
    recs = _sick()
    det = Detector()
    v = det.update(recs[:320])
    assert v.detection_step == 300 and det.latched == v
    bad = StepRecord(step=321, scalars={"loss": math.nan})
    assert det.update([bad]) is None  # latched: nothing until rewind
    det.rewind(260)
    assert det.latched is None
    assert det.update(recs[261:]) == v  # the same records give the same verdict again
    det.rewind(200)
    assert det.update(series(400, seed=1)[201:]) is None  # a clean continuation: nothing


def test_records_out_of_order_raise():
    det = Detector()
    det.update(series(20))
    with pytest.raises(ValueError, match="step 5 after step 19"):
        det.update([StepRecord(step=5, scalars={"loss": 1.0})])


@pytest.mark.parametrize("split", [100, 290, 305])
def test_state_dict_round_trip(split):
    recs = _sick()
    det = Detector()
    v1 = det.update(recs[:split])
    state = json.loads(json.dumps(det.state_dict(), allow_nan=False))  # strict JSON
    det2 = Detector()
    det2.load_state_dict(state)
    assert det2.state_dict() == det.state_dict()
    v2 = det2.update(recs[split:])
    assert (v1 or v2) == first(recs)
    if v1 is not None:  # saved while latched: stays latched
        assert det2.latched == v1 and v2 is None


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match="not a thermo Detector state"):
        Detector().load_state_dict({"version": 99})


def test_verdict_json_round_trip():
    v = Verdict("nonfinite", "loss", None, 3, 5, {"value": math.nan, "limit": math.inf, "x": -math.inf, "y": 1.5},
                "non-finite loss")
    d = json.loads(json.dumps(v.to_dict(), allow_nan=False))
    back = Verdict.from_dict(d)
    assert back.to_dict() == v.to_dict()
    assert math.isnan(back.evidence["value"]) and back.evidence["limit"] == math.inf
    spike = first(_sick())
    assert Verdict.from_dict(json.loads(json.dumps(spike.to_dict()))) == spike
    with pytest.raises(ValueError, match="unknown keys"):
        Verdict.from_dict({**d, "severity": 3})


# -- offline replay --------------------------------------------------------------------------


def test_detect_run_replays_attempts(tmp_path):
    a0 = series(200)
    a0[150].scalars["loss"] *= 100  # verdict at 150
    a1 = series(300, seed=2)
    a1[260].scalars["grad_norm"] *= 1e3  # second attempt, after the rollback to step 120
    for r in a1:
        r.attempt = 1
    with Store(tmp_path) as store:
        store.write(a0)  # all 200 rows: the live run flushed past the verdict before acting
        assert store.begin_attempt(120, "rollback") == 1
        store.write(a1[121:])
    verdicts = detect_run(tmp_path)
    live = Detector()
    expected = [live.update(a0)]
    live.rewind(120)
    expected.append(live.update(a1[121:]))
    assert verdicts == expected
    assert [(v.signal, v.detection_step) for v in verdicts] == [("loss", 150), ("grad_norm", 260)]
    assert detect_run(thermo.load(tmp_path)) == verdicts
    with Store(tmp_path, readonly=True) as store:
        assert detect_run(store) == verdicts
    with pytest.raises(TypeError, match="run directory"):
        detect_run(42)


# -- recorded runs (real Thermometer, real model, real text) -----------------------------------


@pytest.fixture
def one_thread():
    # Tiny models run fastest on one thread, and other tests share the machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run_both_ways(sc, run_dir, config):
    S = _scenarios()
    live = Detector(config)
    out = S.run(sc, run_dir, live=live.update)  # fed a flush at a time, as a guard would
    offline = detect_run(run_dir, config)
    assert offline == out.online  # the offline replay gives the live verdicts
    one_by_one = Detector(config)
    got = [v for v in (one_by_one.update([r]) for r in out.records) if v is not None]
    assert got == out.online
    return out, offline


def test_poisoned_batches_detected_at_the_poisoned_step(tmp_path, one_thread):
    S = _scenarios()
    sc = S.poison(seed=0, steps=100, at=80, dtype="float32")
    out, verdicts = _run_both_ways(sc, tmp_path, DetectorConfig())
    assert len(verdicts) == 1
    v = verdicts[0]
    assert (v.kind, v.signal, v.onset_step, v.detection_step) == ("spike", "loss", 80, 80)
    assert out.diverged == 80 and v.evidence["value"] > 1000 * v.evidence["baseline"]


@pytest.mark.slow
def test_healthy_runs_raise_no_verdict(tmp_path, one_thread):
    S = _scenarios()
    for seed in range(5):  # fp32 for speed here; benchmarks/detection.py checks fp16 ones
        sc = S.healthy(seed=seed, steps=200, dtype="float32")
        out, verdicts = _run_both_ways(sc, tmp_path / f"s{seed}", DetectorConfig(dtype="float16"))
        assert out.diverged is None
        assert verdicts == [], f"seed {seed}: {verdicts[0].message}"


@pytest.mark.slow
def test_fp16_high_lr_detected_before_the_loss_diverges(tmp_path, one_thread):
    # "Diverged": the loss non-finite or above 2x its running minimum (scenarios.diverged_step).
    # LR 0.5 (warm-up 200 steps) under fp16: the residual stream and attention logits climb
    # from step ~10; on this machine this seed's loss jumps above 2x its minimum at step 57
    # (and goes NaN at 211). The run stops at the divergence.
    S = _scenarios()
    sc = replace(S.high_lr(seed=102, steps=300), stop_at_diverged=True)
    out, verdicts = _run_both_ways(sc, tmp_path, DetectorConfig(dtype="float16"))
    assert out.diverged is not None and out.diverged == len(out.losses) - 1
    v = verdicts[0]
    assert v.kind == "growth" and v.signal in ("attn_max", "attn_bound", "act_max", "act_min")
    assert v.onset_step < v.detection_step < out.diverged
    assert v.evidence["ratio"] >= 8.0


def test_detector_config_round_trips_through_json_and_names_an_unknown_field():
    import json

    cfg = DetectorConfig(spikes=(SpikeRule("loss", z=4.0),), growth_stats=("attn_max",), onset_lookback=50)
    assert DetectorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="no field 'onset_lookbak'"):
        DetectorConfig.from_dict({"onset_lookbak": 3})
