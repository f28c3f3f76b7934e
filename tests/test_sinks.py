"""thermo/sinks.py: WandbSink logs what W&B plots well, offline; never slows training down."""

from __future__ import annotations

import json
import math
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
from thermo.sinks import KeyBudget, StepAxis, WandbSink  # noqa: E402


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


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished W&B run file: `run.finish()` can return before wandb-core has
    written the last rows (seen when an earlier test in the process left it busy with an
    unreachable server), so wait for the file's exit record. Until then the file may end in a
    record being written, which does not parse yet."""
    from google.protobuf.message import DecodeError

    end = time.monotonic() + timeout
    while True:
        try:
            recs = list(wandb_records(path))
        except DecodeError:
            if time.monotonic() > end:
                raise
            recs = []
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > end:
            return recs
        time.sleep(0.2)


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
    sink = WandbSink(run_dir=run_dir, project="thermo-test", dir=str(tmp_path), mode="offline",
                     budget=KeyBudget(full=True))
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
    for rec in finished_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            keys |= {it.key or "/".join(it.nested_key) for it in rec.history.item}
        elif kind == "alert":
            alerts.append(rec.alert.title)
        elif kind == "summary":
            summary |= {it.key: it.value_json for it in rec.summary.update}
    layers = {(layer.name, stat) for layer in therm.layers for stat in layer.stats}
    expected = {"thermo/step", "thermo/train_step", "thermo/loss", "thermo/grad_norm", "thermo/attempt",
                "thermo/event/verdict"} | {f"{stat}/{name}" for name, stat in layers}
    assert expected <= keys, sorted(expected - keys)
    assert {"act_max/h.1.attn.c_attn", "attn_max/h.0.attn", "grad_max/h.1"} <= keys
    assert any(k.startswith("thermo/panel/heatmap_act_max") for k in keys)
    assert any(k.startswith("thermo/events") for k in keys)
    assert any(k.startswith("thermo/layers") for k in keys)  # the full table, at a flush
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
        self.delay, self.rows, self.alerts, self.summary, self.commits = delay, [], [], {}, []

    def define_metric(self, *a, **k):
        pass

    def log(self, row, commit=None):
        time.sleep(self.delay)
        self.rows.append(row)
        self.commits.append(commit)

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
    sink = WandbSink(run, max_queue=2, stats=["act_max"], own_steps=True)
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
    assert set(logged[0]) == {"thermo/step", "thermo/train_step", "thermo/attempt", "thermo/loss",
                              "act_max/h.0", "block_act_max/h.0"}
    # the full table rides on the last row of the first flush (then at most every minute)
    assert sum("thermo/layers" in r for r in logged) == 1 and "thermo/layers" in logged[4]


def test_events_become_alerts_and_markers():
    run = SlowRun(0)
    sink = WandbSink(run, own_steps=True)
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


# -- the key budget ---------------------------------------------------------------------------


def _gpt_record(step: int, n_layer: int = 24, hot: str | None = None, nan: str | None = None) -> StepRecord:
    """What a Thermometer records for a GPT of `n_layer` blocks (every stat it can record)."""
    layers = {("wte", "act_max"): 1.0, ("wte", "act_min"): -1.0, ("lm_head", "act_max"): 3.0,
              ("lm_head", "act_min"): -3.0, ("ln_f", "act_max"): 2.0, ("ln_f", "act_min"): -2.0}
    for b in range(n_layer):
        for m in ("", ".ln_1", ".attn.c_attn", ".attn.c_proj", ".ln_2", ".mlp.c_fc", ".mlp.c_proj"):
            layers[(f"h.{b}{m}", "act_max")] = 1.0 + b
            layers[(f"h.{b}{m}", "act_min")] = -1.0 - b
        layers[(f"h.{b}", "grad_max")] = 0.01
        for stat in ("attn_max", "attn_min", "attn_bound"):
            layers[(f"h.{b}.attn", stat)] = 5.0 + b
    if hot:
        layers[(hot, "act_max")] = 5e3
    if nan:
        layers[(nan, "act_min")] = math.nan
    return StepRecord(step=step, scalars={"loss": 2.0, "grad_norm": 1.0, "grad_nonfinite": 0.0,
                                          "wall_time": 0.0}, layers=layers)


def test_default_budget_keeps_a_24_layer_model_under_100_keys_and_the_signal_in():
    rec = _gpt_record(7, hot="h.17.mlp.c_fc", nan="h.3.attn.c_proj")
    assert len(rec.layers) > 400  # what used to be logged every step
    row = KeyBudget().row(rec)
    assert len(row) + 3 <= 100, len(row)  # + thermo/step, train_step, attempt
    assert {"thermo/loss", "thermo/grad_norm", "thermo/grad_nonfinite"} <= set(row)
    assert "thermo/wall_time" not in row
    assert {f"block_act_max/h.{b}" for b in range(24)} <= set(row)
    assert {f"block_attn_max/h.{b}" for b in range(24)} <= set(row)
    assert row["block_act_max/h.17"] == 5e3  # the block aggregate keeps its hottest module
    assert row["act_max/h.17.mlp.c_fc"] == 5e3  # and the hottest layer has its own key
    assert math.isnan(row["act_min/h.3.attn.c_proj"])  # a NaN layer is the hottest of all
    assert len(KeyBudget(full=True).row(rec)) == len(rec.layers) + 3
    tight = KeyBudget(max_keys=20).row(rec)
    assert len(tight) + 3 <= 20 and "thermo/loss" in tight
    with pytest.raises(ValueError, match="max_keys"):
        KeyBudget(max_keys=2)


def test_thermo_step_never_goes_back_after_a_rollback():
    run = SlowRun(0)
    sink = WandbSink(run, own_steps=True)
    sink.write(_records(0, 10))  # attempt 0: steps 0..9
    rolled = [StepRecord(step=s, attempt=1, scalars={"loss": 0.5}) for s in range(6, 12)]
    sink.write(rolled)  # rolled back to step 5: attempt 1 re-trains 6..
    sink.close(timeout=30)
    rows = [r for r in run.rows if "thermo/loss" in r]
    steps = [r["thermo/step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert [r["thermo/train_step"] for r in rows] == list(range(10)) + list(range(6, 12))
    axis = StepAxis()
    assert [axis(s) for s in (0, 1, 2, 1, 2, 0)] == [0, 1, 2, 3, 4, 5]


# -- sharing a run with the user ------------------------------------------------------------


def test_users_step_rows_are_all_kept_next_to_thermos_in_a_run_thermo_did_not_start(tmp_path, monkeypatch):
    """The torchtitan / HF pattern: the user's run is open, they log with step=, and hand thermo
    nothing (it finds wandb.run). Every user row survives, thermo's keys are there too, and the
    run is still open (the user's last log and finish work) after thermo closes."""
    import torch

    import thermo

    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.set_num_threads(1)
    run = wandb.init(project="thermo-test", dir=str(tmp_path), mode="offline")
    try:
        run_dir = tmp_path / "run"
        sink = WandbSink(run_dir=run_dir)
        model = _viz.tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ds = _viz.dataset()
        therm = thermo.Thermometer(model, run_dir=run_dir, flush_every=5, sinks=[sink])
        n = 30
        for step in range(n):
            x, y = ds.batch([(step * 4 + i) % len(ds) for i in range(4)])
            _, loss = model(x, y)
            loss.backward()
            therm.step(loss)
            opt.step()
            opt.zero_grad()
            run.log({"train/loss": loss.item(), "train/lr": 1e-3}, step=step)
            if step % 5 == 4:
                time.sleep(0.05)  # let the sink's thread hand over its flush
        therm.close()
        assert sink._own_run is False and sink.error is None
        run.log({"train/loss": 0.0}, step=n)  # thermo did not finish the user's run
    finally:
        run.finish()
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    user_steps, thermo_rows, widths = set(), 0, []
    for rec in finished_records(files[0]):
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {it.key or "/".join(it.nested_key): it.value_json for it in rec.history.item}
        widths.append(len(items))
        if "train/loss" in items:
            user_steps.add(int(items["_step"]))
        thermo_rows += "thermo/loss" in items
    assert user_steps == set(range(n + 1)), sorted(set(range(n + 1)) - user_steps)
    assert thermo_rows >= 4  # one per flush, riding on the user's rows


def test_offline_24_layer_model_logs_at_most_100_keys_a_step(tmp_path, monkeypatch):
    import torch

    import thermo
    from thermo.gpt import GPT, GPTConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=24, n_head=2, n_embd=16, block_size=16))
    sink = WandbSink(project="thermo-test", dir=str(tmp_path), mode="offline", table_every_s=3600)
    therm = thermo.Thermometer(model, flush_every=5, sinks=[sink])
    ds = _viz.dataset()
    for step in range(10):
        x, y = ds.batch([(step * 4 + i) % len(ds) for i in range(4)])
        _, loss = model(x[:, :16], y[:, :16])
        loss.backward()
        therm.step(loss)
    therm.close()
    assert sink.error is None and sink.logged == 10
    assert sum(len(layer.stats) for layer in therm.layers) > 300
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    widths = []
    for rec in finished_records(files[0]):
        if rec.WhichOneof("record_type") == "history":
            keys = {it.key or "/".join(it.nested_key) for it in rec.history.item}
            if "thermo/loss" in keys:
                widths.append(len([k for k in keys if not k.startswith("_")]))
    assert len(widths) == 10 and max(widths) <= 100, widths


# -- TensorBoard ------------------------------------------------------------------------------


def test_tensorboard_event_file_holds_the_budgeted_keys_and_the_stores_values(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install 'thermo[tensorboard]'")
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from thermo.sinks import TensorBoardSink

    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    with Store(run_dir) as store:
        store.event("verdict", "loss spike", step=12, kind="spike", signal="loss", layer="h.1.attn",
                    onset_step=8, detection_step=12)
    sink = TensorBoardSink(run_dir=run_dir)
    model = _viz.tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _viz.train(run_dir, model, opt, 20, sinks=[sink])  # closes the sink
    assert sink.logged == 20 and (run_dir / "tensorboard").is_dir()
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"thermo/loss", "thermo/grad_norm", "thermo/attempt", "block_act_max/h.0",
            "block_act_max/h.1", "block_attn_max/h.1", "thermo/event/verdict"} <= tags
    assert all(t.startswith(("thermo/", "block_")) or t.split("/")[0] in {
        "act_max", "act_min", "grad_max", "attn_max", "attn_min", "attn_bound"} for t in tags)
    with Store(run_dir, readonly=True) as store:
        real = {r.step: r for r in store.records()}
    loss = {e.step: e.value for e in acc.Scalars("thermo/loss")}
    assert sorted(loss) == list(range(20))
    assert all(loss[s] == pytest.approx(real[s].scalars["loss"], rel=1e-6) for s in loss)
    block = {e.step: e.value for e in acc.Scalars("block_act_max/h.1")}
    want = max(v for (layer, stat), v in real[7].layers.items()
               if stat == "act_max" and (layer == "h.1" or layer.startswith("h.1.")))
    assert block[7] == pytest.approx(want, rel=1e-6)
    assert [e.step for e in acc.Scalars("thermo/event/verdict")] == [12]
    assert "thermo/events/text_summary" in acc.Tags()["tensors"]


def test_the_workspace_charts_the_keys_the_sink_logs(capsys):
    pytest.importorskip("wandb_workspaces", reason="needs wandb-workspaces: pip install 'thermo[wandb]'")
    import re

    from thermo.sinks import workspace as wsmod

    view = wsmod.workspace("team", "gpt")
    assert [s.name for s in view.sections][:3] == ["thermo: loss", "thermo: blocks", "thermo: hottest layers"]
    row = KeyBudget().row(_gpt_record(3, hot="h.17.mlp.c_fc"))
    logged = set(row) | {"thermo/step", "thermo/attempt", "thermo/event/verdict"}
    for section in view.sections:
        for panel in section.panels:
            if not hasattr(panel, "x"):
                continue
            assert panel.x == "thermo/step"
            if panel.metric_regex:
                hits = [k for k in logged if re.search(panel.metric_regex, k)]
                assert hits and all(k.split("/")[0] == hits[0].split("/")[0] for k in hits), hits
            else:
                assert panel.y[0] in logged, panel.y
    assert wsmod.main(["team/gpt", "--dry-run"]) == 0
    assert "thermo: blocks: activation max per block" in capsys.readouterr().out
    assert wsmod.main(["team-gpt", "--dry-run"]) == 2


def test_in_a_shared_run_event_markers_never_move_the_values_step():
    run = SlowRun(0)
    sink = WandbSink(run)  # a run of the user's: thermo joins their rows
    sink.write(_records(0, 5))
    sink.event("verdict", "spike", step=2)
    sink.close(timeout=30)
    assert set(run.commits) == {False}  # never a row of its own
    values = [r for r in run.rows if "thermo/loss" in r]
    assert len(values) == 1 and values[0]["thermo/step"] == 4 and values[0]["thermo/train_step"] == 4
    marks = [r for r in run.rows if "thermo/event/verdict" in r]
    assert marks == [{"thermo/event/verdict": 1}]
    assert sink.logged == 5
