"""thermo/sinks.py: WandbSink logs what W&B plots well, offline; never slows training down."""

from __future__ import annotations

import json
import statistics
import struct
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _viz  # noqa: E402

from thermo.store import StepRecord, Store  # noqa: E402

wandb = pytest.importorskip("wandb", reason="needs the wandb extra: pip install 'thermo[wandb]'")
from thermo.sinks import WandbSink  # noqa: E402


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    # Keep W&B's config, cache and logs inside the test's folder, and quiet.
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def wandb_records(path: Path):
    """The records of a W&B run file (``run-*.wandb``): a LevelDB-style log (32 KiB blocks of
    chunks with a 7-byte header: crc32, length, type) of protobuf ``Record``s after a 7-byte
    file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end one
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _train_steps(sinks, steps: int):
    """Per-step wall times of a tiny GPT recorded by a Thermometer with `sinks` (no store), and
    the thermometer (still open: its close flushes the last rows and closes the sinks)."""
    import torch

    import thermo

    model = _viz.tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = _viz.dataset()
    therm = thermo.Thermometer(model, flush_every=5, sinks=sinks)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = ds.batch([(step * 4 + i) % len(ds) for i in range(4)])
        _, loss = model(x, y)
        loss.backward()
        therm.step(loss)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times, therm


def test_offline_run_holds_every_key(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    sink = WandbSink(run_dir=run_dir, project="thermo-test", dir=str(tmp_path), mode="offline")
    model = _viz.tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Store(run_dir) as store:  # a verdict the sink forwards from the store
        store.event("verdict", "loss spike", step=12, signal="loss", layer="h.1.attn",
                    onset_step=8, detection_step=12)
    therm = _viz.train(run_dir, model, opt, 30, sinks=[sink])  # closes the sink
    assert sink.error is None and sink.dropped == 0 and sink.logged == 30

    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    keys, alerts, summary = set(), [], {}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            keys |= {it.key or "/".join(it.nested_key) for it in rec.history.item}
        elif kind == "alert":
            alerts.append(rec.alert.title)
        elif kind == "summary":
            summary |= {it.key: it.value_json for it in rec.summary.update}
    layers = {(layer.name, stat) for layer in therm.layers for stat in layer.stats}
    expected = {"thermo/step", "thermo/loss", "thermo/grad_norm", "thermo/attempt",
                "thermo/event/verdict"} | {f"{stat}/{name}" for name, stat in layers}
    assert expected <= keys, sorted(expected - keys)
    assert {"act_max/h.1.attn.c_attn", "attn_max/h.0.attn", "grad_max/h.1"} <= keys
    assert any(k.startswith("thermo/panel/heatmap_act_max") for k in keys)
    assert any(k.startswith("thermo/events") for k in keys)
    assert alerts == ["thermo verdict at step 12"]
    assert summary["thermo/dropped_steps"] == "0"
    table = next((tmp_path / "wandb").glob("offline-run-*/files/media/table/thermo/events_*.json"))
    assert json.loads(table.read_text())["data"][0][:2] == [12, "verdict"]


def test_unreachable_wandb_does_not_slow_training(tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    # W&B "online" against a closed local port: init retries until its timeout, then fails.
    # Said in Settings, not only the environment: wandb caches its setup once per process.
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    settings = wandb.Settings(init_timeout=3, mode="online", base_url="http://127.0.0.1:9",
                              api_key="x" * 40)
    n = 60
    baseline, therm = _train_steps([], n)
    therm.close()
    sink = WandbSink(project="thermo-test", dir=str(tmp_path), max_queue=4, close_timeout=30,
                     settings=settings)
    with pytest.warns(UserWarning, match="dropping records"):
        with_sink, therm = _train_steps([sink], n)
        t0 = time.perf_counter()
        therm.close()  # closes the sink: waits for W&B's init to give up, at most close_timeout
        closed_in = time.perf_counter() - t0
    # Generous on purpose (2 shared cores): a stalled sink would cost whole seconds per flush.
    base, slow = statistics.median(baseline), statistics.median(with_sink)
    assert slow < 2 * base + 0.01, f"median step {slow * 1e3:.1f} ms with sink vs {base * 1e3:.1f} ms"
    assert max(with_sink) < 1.0, f"a step took {max(with_sink):.2f} s"
    assert sink.logged == 0 and sink.dropped == n
    assert sink.error and ("CommError" in sink.error or "127.0.0.1:9" in sink.error), sink.error
    assert closed_in < 30


class SlowRun:
    """A W&B run whose every call takes `delay` seconds (a slow network), recording calls."""

    def __init__(self, delay: float):
        self.delay, self.rows, self.alerts, self.summary = delay, [], [], {}

    def define_metric(self, *a, **k):
        pass

    def log(self, row):
        time.sleep(self.delay)
        self.rows.append(row)

    def alert(self, title, text, level=None, wait_duration=None):
        self.alerts.append(title)

    def finish(self):
        raise AssertionError("a run the user passed in is theirs to finish")


def _records(first: int, n: int) -> list[StepRecord]:
    return [StepRecord(step=s, scalars={"loss": 1.0, "wall_time": 0.0},
                       layers={("h.0", "act_max"): 2.0, ("h.0", "act_min"): -2.0})
            for s in range(first, first + n)]


def test_slow_wandb_drops_with_a_count_instead_of_blocking():
    run = SlowRun(delay=0.02)
    sink = WandbSink(run, max_queue=2, stats=["act_max"])
    waits = []
    with pytest.warns(UserWarning, match="not keeping up"):
        for flush in range(40):
            t0 = time.perf_counter()
            sink.write(_records(flush * 5, 5))
            waits.append(time.perf_counter() - t0)
    sink.close(timeout=30)
    assert max(waits) < 0.1, f"write blocked {max(waits):.3f} s"
    assert sink.dropped > 0 and sink.logged + sink.dropped == 200
    logged = [r for r in run.rows if "thermo/loss" in r]
    assert len(logged) == sink.logged
    # the row W&B gets: scalars under thermo/, the chosen per-layer stats, no wall clock
    assert set(logged[0]) == {"thermo/step", "thermo/attempt", "thermo/loss", "act_max/h.0"}


def test_events_become_alerts_and_markers():
    run = SlowRun(0)
    sink = WandbSink(run)
    sink.write(_records(0, 5))
    sink.event("rollback", "restored 10", step=20, from_step=20, to_step=10, n_blacklisted=3)
    sink.event("blacklist", "manual", added=[1, 2])  # no alert for this kind, still a marker
    sink.close(timeout=30)
    assert run.alerts == ["thermo rollback at step 20"]
    marks = [r for r in run.rows if any(k.startswith("thermo/event/") for k in r)]
    assert marks == [{"thermo/step": 20, "thermo/event/rollback": 1},
                     {"thermo/step": 4, "thermo/event/blacklist": 1}]
    assert sink.error is None


def test_sink_is_inert_until_written_to():
    sink = WandbSink(SlowRun(0), max_queue=1)
    assert sink._thread is None  # other ranks build it too and never open a run
    sink.close()
    sink.write(_records(0, 1))  # after close: ignored
    assert sink.logged == sink.dropped == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_queue"):
        WandbSink(SlowRun(0), max_queue=0)
