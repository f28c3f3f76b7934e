"""thermo/dashboard.py: the incremental read-only reader, the Dash app, and a real browser on a
store that a training process is filling."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _viz  # noqa: E402

from thermo import plots  # noqa: E402
from thermo.dashboard import RunReader, create_app  # noqa: E402
from thermo.rundir import RunDir  # noqa: E402
from thermo.store import StepRecord, Store, StoreError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


def _rec(step, attempt=0, loss=1.0):
    return StepRecord(step=step, attempt=attempt, scalars={"loss": loss, "grad_norm": 0.5},
                      layers={("h.0", "act_max"): float(step), ("h.0.attn", "attn_max"): 2.0})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}: "
                                 f"{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _store_last(run_dir) -> StepRecord | None:
    try:
        store = Store(run_dir, readonly=True)
    except StoreError:  # not created yet, or being created
        return None
    with store:
        recs = list(store.records(effective=True))
    return max(recs, key=lambda r: r.step) if recs else None


# -- the reader -----------------------------------------------------------------------------


def test_reader_is_incremental_and_follows_rollbacks(tmp_path):
    reader = RunReader(tmp_path / "run")
    assert reader.poll() is False  # no store yet: wait for it, no error
    store = Store(tmp_path / "run")
    store.write([_rec(s, loss=10.0 - s) for s in range(10)])
    assert reader.poll() is True
    run = reader.run()
    assert run.scalars["step"].tolist() == list(range(10))
    assert reader.poll() is False and reader.run() is run  # nothing new: nothing redone
    store.write([_rec(s, loss=math.nan if s == 12 else 1.0) for s in range(10, 15)])
    assert reader.poll() is True and reader._cursor.scalars == {0: 14} and reader._cursor.layers == {0: 14}
    run = reader.run()
    assert len(run.scalars) == 15 and math.isnan(run.scalars.set_index("step").loc[12, "loss"])
    # a rollback: attempt 1 resumes after step 5; attempt 0's steps 6..14 leave the timeline
    store.event("rollback", "to 5", step=14, from_step=14, to_step=5)
    attempt = store.begin_attempt(5, "rollback")
    store.write([_rec(s, attempt=attempt, loss=3.0) for s in range(6, 9)])
    assert reader.poll() is True
    run = reader.run()
    eff = run.scalars[plots.effective_mask(run.scalars, run.attempts)]
    assert eff["step"].tolist() == list(range(9)) and eff["attempt"].tolist() == [0] * 6 + [1] * 3
    assert len(run.scalars) == 18 and len(run.events) == 1
    assert plots.run_summary(run)["last_step"] == 8
    store.close()
    reader.close()


def test_reader_never_waits_for_the_writer(tmp_path):
    store = Store(tmp_path)
    store.write([_rec(s) for s in range(5)])
    reader = RunReader(tmp_path)
    assert reader.poll()
    # the trainer is in the middle of a write transaction: the reader neither waits nor sees it
    writer = sqlite3.connect(RunDir(tmp_path).db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO scalars VALUES (0, 99, 'loss', 1.0)")
    t0 = time.monotonic()
    assert reader.poll() is False
    assert time.monotonic() - t0 < 0.5
    # and while the reader reads, the writer commits at once (WAL: readers never block writers)
    with reader._store.snapshot():
        reader._store.scalars()
        writer.execute("COMMIT")
    assert reader.poll() is True and reader.run().scalars["step"].max() == 99
    writer.close()
    store.close()
    reader.close()


# -- the app without a browser ---------------------------------------------------------------


def test_app_serves_layout_and_callback_matches_store(tmp_path):
    with Store(tmp_path) as store:
        store.write([_rec(s, loss=5.0 - 0.1 * s) for s in range(20)])
    app = create_app(tmp_path, "attention")
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    layout = json.dumps(client.get("/_dash-layout").get_json())
    for i, panel in enumerate(plots.load_layout("attention")["panels"]):
        assert f"panel-{i}-{panel['type']}" in layout
    deps = client.get("/_dash-dependencies").get_json()
    dep = next(d for d in deps if "graph-0.figure" in d["output"])
    body = _body(dep, {"thermo-tick.n_intervals": 1, "thermo-version.data": -1})
    resp = client.post("/_dash-update-component", json=body).get_json()["response"]
    assert resp["thermo-last-step"]["children"] == "19"
    assert float(resp["thermo-loss"]["children"]) == pytest.approx(5.0 - 0.1 * 19)
    assert resp["graph-0"]["figure"]["data"], "attention panel is empty"
    headline = json.dumps(resp["thermo-headline"]["children"])
    assert "training" in headline and "no verdicts" in headline
    # same version again: nothing is rebuilt or resent
    body = _body(dep, {"thermo-tick.n_intervals": 2,
                       "thermo-version.data": resp["thermo-version"]["data"]})
    again = client.post("/_dash-update-component", json=body)
    assert again.status_code == 204 or "graph-0" not in (again.get_json() or {}).get("response", {})


def _body(dep: dict, values: dict) -> dict:
    """A /_dash-update-component request for callback `dep`, every input and state given
    (`values` by "id.property", None otherwise), triggered by the first value."""
    def items(specs):
        return [{"id": x["id"], "property": x["property"],
                 "value": values.get(f"{x['id']}.{x['property']}")} for x in specs]
    return {"output": dep["output"],
            "outputs": [_parse_output(o) for o in dep["output"][2:-2].split("...")],
            "inputs": items(dep["inputs"]), "state": items(dep["state"]),
            "changedPropIds": [next(iter(values))]}


def _parse_output(spec: str) -> dict:
    cid, prop = spec.rsplit(".", 1)
    return {"id": cid, "property": prop}


def test_cli_dashboard_refuses_a_bad_layout_in_one_line(tmp_path):
    from click.testing import CliRunner

    from thermo.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('{"panels": [{"type": "pie"}]}')
    res = CliRunner().invoke(main, ["dashboard", str(tmp_path), "--layout", str(bad)])
    assert res.exit_code == 2 and "panel 0 has type 'pie'" in res.output


# -- a real browser on a live run -------------------------------------------------------------


@pytest.fixture
def training(tmp_path):
    """A training process filling tmp_path/run; stopped at teardown."""
    run_dir, stop = tmp_path / "run", tmp_path / "stop"
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "_viz.py"), "train", str(run_dir),
         "--steps", "3000", "--sleep", "0.05", "--stop-file", str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        yield run_dir, proc
    finally:
        stop.touch()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.browser
@pytest.mark.skipif(_viz.chromium() is None,
                    reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_live_dashboard_in_chromium(training, tmp_path, monkeypatch):
    from werkzeug.serving import make_server

    run_dir, proc = training
    _wait(lambda: (s := _store_last(run_dir)) is not None and s.step >= 10, 90,
          "the trainer's first flushes", proc)
    # Every status the page is sent, in order: proves the page refreshed itself with new steps.
    served: list[dict] = []
    summary = plots.run_summary
    monkeypatch.setattr(plots, "run_summary", lambda run: served.append(summary(run)) or served[-1])
    layout = {**plots.load_layout(), "refresh_s": 1.0}
    app = create_app(run_dir, layout)
    port = _free_port()
    server = make_server("127.0.0.1", port, app.server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        shot = tmp_path / "dashboard.png"
        t0 = time.monotonic()
        dom = _viz.load(f"http://127.0.0.1:{port}/", screenshot=shot, size=(1100, 1500),
                        budget_ms=6000)
        print(f"page load {time.monotonic() - t0:.1f} s, {len(served)} refreshes:",
              [s["last_step"] for s in served])
    finally:
        server.shutdown()
    assert proc.poll() is None, "the trainer stopped while the page was open"
    # every panel is drawn by plotly
    for i, panel in enumerate(layout["panels"]):
        html = _viz.section(dom, f"panel-{i}-{panel['type']}")
        assert "js-plotly-plot" in html and "main-svg" in html, f"panel {i} ({panel['type']}) not drawn"
    assert "heatmaplayer" in _viz.section(dom, "panel-1-heatmap")
    # the numbers shown are the store's
    shown_step = int(_viz.element_text(dom, "thermo-last-step"))
    shown_loss = float(_viz.element_text(dom, "thermo-loss"))
    with Store(run_dir, readonly=True) as store:
        rec = {r.step: r for r in store.records(effective=True)}[shown_step]
    assert shown_loss == pytest.approx(rec.scalars["loss"], rel=1e-5)
    assert float(_viz.element_text(dom, "thermo-grad-norm")) == pytest.approx(
        rec.scalars["grad_norm"], rel=1e-5)
    # and the page moved on by itself: a later refresh brought a newer step than the first render
    assert len(served) >= 2, f"the page refreshed {len(served)} times"
    assert served[0]["last_step"] < served[-1]["last_step"] == shown_step
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "dashboard.png")


def test_cli_dashboard_serves(tmp_path):
    with Store(tmp_path) as store:
        store.write([_rec(s) for s in range(3)])
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "thermo.cli", "dashboard", str(tmp_path),
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/_dash-layout", timeout=2).status == 200
            except OSError:
                return False
        _wait(up, 60, "thermo dashboard to listen", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# Zoom the loss panel and pick log on the attention panel once both are drawn, then wait for a
# refresh that brings new rows, and report what the axes hold after it.
_ZOOM_JS = r"""
(function () {
  var U = window.thermoUser, phase = 0, n0 = 0, zoomed = null, seen = 0;
  setInterval(function () {
    var loss = U.graph('graph-0'), attn = U.graph('graph-4'), heat = U.graph('graph-1');
    if (!loss || !attn || !heat || !loss.data || !attn.data || !loss.data.length) return;
    var n = loss.calcdata && loss.calcdata[0] ? loss.calcdata[0].length : 0;
    // (once the page script has hooked the graphs: a user is slower than this test)
    var hooked = loss.__thermoRelayout && attn.__thermoRelayout && heat.__thermoRelayout;
    if (phase === 0 && hooked && n >= 5 && attn.data.length) {
      U.zoom(loss, 0.3, 0.6);
      U.button(attn, 'log');
      zoomed = loss.layout.xaxis.range.slice();
      n0 = n; phase = 1;
    } else if (phase === 1 && n > n0 && ++seen >= 2) {
      phase = 2;
      U.report({zoomed: zoomed, after: loss.layout.xaxis.range, heat: heat.layout.xaxis.range,
                n0: n0, n1: n, attn_type: attn.layout.yaxis.type,
                autorange: loss.layout.xaxis.autorange});
    }
  }, 100);
})();
"""


def _serve(app):
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/"


def _with_script(app, js: str):
    app.index_string = app.index_string.replace(
        "{%renderer%}", "{%renderer%}<script>" + _viz.USER_JS + js + "</script>")
    return app


@pytest.mark.browser
@pytest.mark.skipif(_viz.chromium() is None,
                    reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_zoom_and_scale_survive_refreshes_and_the_headline_tells_the_story(training, tmp_path):
    run_dir, proc = training
    _wait(lambda: (s := _store_last(run_dir)) is not None and s.step >= 10, 90,
          "the trainer's first flushes", proc)
    with Store(run_dir, lock=False) as store:  # events only, beside the trainer (as the supervisor)
        store.event("verdict", "act_max of h.1 grew", step=9, kind="growth", signal="act_max",
                    layer="h.1", onset_step=4, detection_step=9, evidence={}, cause="data")
        store.event("rollback", "rolled back", step=9, from_step=9, to_step=3, onset_step=4,
                    detection_step=9, n_blacklisted=24, action="rollback")
    app = _with_script(create_app(run_dir, {**plots.load_layout(), "refresh_s": 0.5}), _ZOOM_JS)
    server, url = _serve(app)
    try:
        dom = _viz.load(url, size=(1100, 1500), budget_ms=12000)
    finally:
        server.shutdown()
    got = _viz.page_result(dom)
    assert got is not None, "the page never saw a refresh with new rows after the zoom"
    assert got["n1"] > got["n0"], got  # new rows arrived ...
    assert got["after"] == pytest.approx(got["zoomed"]), got  # ... and the zoom stayed
    assert got["zoomed"][1] - got["zoomed"][0] < 0.5 * got["n0"] * 1.0, got
    assert got["heat"] == pytest.approx(got["zoomed"]), got  # the step axes are linked
    assert got["attn_type"] == "log", got  # the scale picked with the button stayed too
    assert _viz.element_text(dom, "thermo-run-status") == "training"
    incidents = _viz.section(dom, "thermo-headline") or dom
    assert ("step 9: growth of act_max in h.1 (onset 4, cause: data) → rolled back to step 3; "
            "blacklisted 24 samples") in incidents


_CLICK_JS = r"""
(function () {
  var U = window.thermoUser, done = false, before = null;
  setInterval(function () {
    var heat = U.graph('graph-3'), layer = U.graph('thermo-layer-graph');
    if (done || !heat || !heat.data || !heat.data.length || !layer || !layer.layout.title) return;
    var title = layer.layout.title.text || '';
    if (before === null && /^layer h/.test(title)) {
      before = title;
      U.clickRow(heat, 'h.0.attn');
    } else if (before !== null && title !== before) {
      done = true;
      U.report({before: before, after: title,
                traces: layer.data.map(function (t) { return t.name; })});
    }
  }, 100);
})();
"""


@pytest.mark.browser
@pytest.mark.skipif(_viz.chromium() is None,
                    reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_clicking_a_heatmap_row_shows_that_layers_curve(tmp_path_factory, tmp_path):
    run_dir = _viz.shared_incident_run(tmp_path_factory)
    app = _with_script(create_app(run_dir), _CLICK_JS)
    server, url = _serve(app)
    try:
        shot = tmp_path / "incident.png"
        dom = _viz.load(url, screenshot=shot, size=(1100, 3600), budget_ms=10000)
    finally:
        server.shutdown()
    got = _viz.page_result(dom)
    # before any click the layer panel shows the verdict's layer; the click switches it
    assert got is not None, "the layer panel never changed after the click"
    assert (got["before"], got["after"]) == ("layer h.1.attn", "layer h.0.attn"), got
    # one row per statistic the layer records, each with its rolled-back branch
    assert got["traces"][:2] == ["attn_max", "attn_max (rolled back)"], got
    assert "attn_min (rolled back)" in got["traces"], got
    # the heatmap strip of the rolled-back branch is drawn, with the verdict's row marked
    heat = _viz.section(dom, "panel-3-heatmap")
    assert "rolled-back branch" in heat and "▶ h.1.attn" in heat
    assert "gave up" not in _viz.section(dom, "thermo-headline")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "dashboard-incident.png")


def test_cli_dashboard_taken_port_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from thermo.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = CliRunner().invoke(main, ["dashboard", str(tmp_path), "--port", str(port)])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert f"port {port} on 127.0.0.1 is already in use" in res.output and "--port" in res.output


def test_cli_dashboard_unknown_layout_name_is_one_line(tmp_path):
    from click.testing import CliRunner

    from thermo.cli import main

    res = CliRunner().invoke(main, ["dashboard", str(tmp_path), "--layout", "atention"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "no layout named 'atention'; shipped layouts: attention, deep, default" in res.output


def test_compare_app_overlays_runs_and_heads_each(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with Store(a) as store:
        store.write([_rec(s, loss=5.0 - 0.1 * s) for s in range(20)])
    with Store(b) as store:
        store.write([_rec(s, loss=4.0) for s in range(10)])
        store.event("verdict", "loss spike", step=8, kind="spike", signal="loss", layer=None,
                    onset_step=6, detection_step=8)
        store.event("give_up", "gave up", step=8, reason="no good checkpoint from before the onset")
    app = create_app([a, b])
    client = app.server.test_client()
    dep = client.get("/_dash-dependencies").get_json()[0]
    resp = client.post("/_dash-update-component", json=_body(dep, {
        "thermo-tick.n_intervals": 1, "thermo-version.data": None})).get_json()["response"]
    fig = resp["graph-compare"]["figure"]
    shown = [t["name"] for t in fig["data"] if t.get("showlegend") is not False]
    assert shown == [str(a), str(b)]
    assert any(t["name"] == f"{b}: verdicts" for t in fig["data"])
    head_b = json.dumps(resp["run1-headline"]["children"])
    assert "gave up at step 8: no good checkpoint from before the onset" in head_b
    assert "run1-run-status" in head_b and "training" in json.dumps(resp["run0-headline"]["children"])


def test_reader_opens_a_run_directory_named_with_uri_characters(tmp_path):
    run_dir = tmp_path / "exp #1?lr=3e-4 100%"
    with Store(run_dir) as store:
        store.write([_rec(s) for s in range(4)])
    reader = RunReader(run_dir)
    assert reader.poll() and reader.run().scalars["step"].tolist() == [0, 1, 2, 3]
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_dir.name]  # no stray files beside it


def test_heatmap_row_controls_regroup_and_filter(tmp_path):
    with Store(tmp_path) as store:
        store.write([StepRecord(step=s, scalars={"loss": 1.0}, layers={
            (f"h.{b}{m}", "act_max"): 1.0 + b for b in range(3) for m in ("", ".attn.c_attn", ".mlp.c_fc")})
            for s in range(6)])
    app = create_app(tmp_path, {"panels": [{"type": "heatmap", "stat": "act_max"}]})
    client = app.server.test_client()
    dep = next(d for d in client.get("/_dash-dependencies").get_json() if "graph-0.figure" in d["output"])

    def rows(**values):
        body = _body(dep, {"thermo-tick.n_intervals": 1, "thermo-version.data": -1, **values})
        resp = client.post("/_dash-update-component", json=body).get_json()["response"]
        return resp, list(resp["graph-0"]["figure"]["data"][0]["y"])

    resp, every = rows()
    assert len(every) == 9
    assert [o["value"] for o in resp["types-0"]["options"]] == ["attn.c_attn", "block", "mlp.c_fc"]
    assert rows(**{"rows-0.value": "block"})[1] == ["h.0", "h.1", "h.2"]
    assert rows(**{"rows-0.value": "top"})[1] == every  # fewer than 20 layers: all are the hottest
    assert rows(**{"types-0.value": ["mlp.c_fc"]})[1] == ["h.0.mlp.c_fc", "h.1.mlp.c_fc", "h.2.mlp.c_fc"]
    # a control changed with nothing new in the store still redraws (the page shows the version)
    body = _body(dep, {"rows-0.value": "block", "thermo-tick.n_intervals": 2,
                       "thermo-version.data": resp["thermo-version"]["data"]})
    redrawn = client.post("/_dash-update-component", json=body).get_json()["response"]
    assert list(redrawn["graph-0"]["figure"]["data"][0]["y"]) == ["h.0", "h.1", "h.2"]
