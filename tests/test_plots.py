"""The panel builders in thermo/plots/, on real runs and on fixed signal sequences."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _viz  # noqa: E402

from thermo import plots  # noqa: E402
from thermo.dashboard import read_run  # noqa: E402
from thermo.store import Run, StepRecord, Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def incident(tmp_path_factory):
    run_dir = _viz.shared_incident_run(tmp_path_factory)
    return run_dir, read_run(run_dir)


def _synthetic(values: dict[tuple[str, str], np.ndarray], scalars: dict[str, np.ndarray] | None = None,
               layers_meta: list[dict] | None = None) -> Run:
    rows = [
        {"attempt": 0, "step": i, "layer": layer, "stat": stat, "value": float(v)}
        for (layer, stat), arr in values.items() for i, v in enumerate(arr)
    ]
    sc = pd.DataFrame({"attempt": 0, "step": np.arange(len(next(iter((scalars or {"x": [0]}).values()))))})
    for k, arr in (scalars or {}).items():
        sc[k] = arr
    attempts = pd.DataFrame({"attempt": [0], "start_step": [-1], "time": [0.0], "reason": ["start"],
                             "end_step": [2**62]})
    events = pd.DataFrame(columns=["id", "time", "attempt", "step", "kind", "message", "data"])
    return Run(Path("."), sc, pd.DataFrame(rows), events, attempts, {"layers": layers_meta or []})


# -- downsampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("spike", [1e6, -1e6, math.nan, math.inf, -math.inf])
def test_single_spike_survives_downsampling_of_1m_points(spike):
    rng = np.random.default_rng(0)
    y = rng.normal(size=1_000_000)
    where = 654_321
    y[where] = spike
    x = np.arange(len(y))
    xs, ys = plots.downsample(x, y, max_points=4000)
    assert len(xs) <= 4000
    assert where in set(xs.tolist())
    got = ys[xs == where][0]
    assert (math.isnan(got) and math.isnan(spike)) or got == spike
    # the envelope is kept too: the global extremes of the noise are still there
    finite = y[np.isfinite(y) & (np.abs(y) < 1e5)]
    assert finite.max() in ys and finite.min() in ys


def test_short_series_is_untouched():
    y = np.array([1.0, math.nan, 3.0])
    xs, ys = plots.downsample(np.arange(3), y, max_points=10)
    assert xs.tolist() == [0, 1, 2] and math.isnan(ys[1])


# -- loss panel -----------------------------------------------------------------------------


def test_loss_panel_shows_history(incident):
    run_dir, run = incident
    fig = plots.loss_figure(run)
    by_name = {}
    for t in fig.data:
        by_name.setdefault(t.name, []).append(t)
    loss = by_name["loss"][0]
    # the effective timeline: attempt 0 up to the restored step, then attempt 1
    assert list(loss.x) == sorted(loss.x)
    assert max(loss.x) == 45 and 20 in loss.x and 21 in loss.x
    with Store(run_dir, readonly=True) as store:
        real = {(r.attempt, r.step): r.scalars["loss"] for r in store.records(effective=False)}
    assert loss.y[list(loss.x).index(21)] == pytest.approx(real[(1, 21)])
    assert loss.y[list(loss.x).index(10)] == pytest.approx(real[(0, 10)])
    # the abandoned branch (attempt 0, steps 21..39) is drawn faintly
    rolled = by_name["rolled back"][0]
    assert list(rolled.x) == list(range(21, 40)) and rolled.opacity < 1
    assert rolled.y[0] == pytest.approx(real[(0, 21)])
    # the NaN grad norm of step 28 is a marker, not a silent gap
    bad = [t for t in by_name["non-finite"] if "grad_norm" in t.text[0]]
    assert list(bad[0].x) == [28] and bad[0].text[0] == "grad_norm: NaN"
    # verdict/rollback: onset..detection shaded, an arrow from detection back to the restored step
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert any(s.x0 == 25 and s.x1 == 30 for s in rects)
    arrows = [a for a in fig.layout.annotations if a.showarrow and a.ax is not None]
    assert any(a.x == 20 and a.ax == 30 and "rollback" in a.text for a in arrows)
    lines = {s.x0 for s in fig.layout.shapes if s.type == "line"}
    assert {20, 28, 42} <= lines  # attempt 1 start, skipped step, restart
    # log-scale option: buttons, and log_y starts log
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["linear", "log"]
    assert plots.loss_figure(run, log_y=True).layout.yaxis.type == "log"


def test_loss_panel_on_empty_run():
    run = _synthetic({("a", "act_max"): np.array([])}, scalars={"loss": np.array([])})
    fig = plots.loss_figure(run)
    assert fig.layout.height > 0


# -- heatmap --------------------------------------------------------------------------------


def test_heatmap_rows_follow_model_order_and_values_match_store(incident):
    run_dir, run = incident
    fig = plots.heatmap_figure(run, "act_max")
    hm = fig.data[0]
    names = [e["name"] for e in run.meta["layers"] if "act_max" in e["stats"]]
    assert list(hm.y) == names and names[0] == "wte" and names[-1] == "lm_head"
    assert fig.layout.yaxis.autorange == "reversed"  # first layer on top
    with Store(run_dir, readonly=True) as store:
        df = store.layer_stats(stats=["act_max"])
    x = list(hm.x)
    for layer, step in [("h.1.mlp.c_fc", 7), ("ln_f", 33)]:
        v = df[(df.layer == layer) & (df.step == step)]["value"].iloc[0]
        i, j = names.index(layer), x.index(step)
        assert hm.customdata[i][j] == pytest.approx(v)
        assert hm.z[i][j] == pytest.approx(math.log10(abs(v)))
    att = plots.heatmap_figure(run, "attn_max").data[0]
    assert list(att.y) == ["h.0.attn", "h.1.attn"]


def test_heatmap_binning_keeps_the_spike_and_marks_nonfinite():
    n = 5000
    a = np.ones(n)
    a[3210] = 1e4
    b = np.ones(n)
    b[4000] = math.nan
    meta = [{"name": "b", "kind": "module", "stats": ["act_max"]},
            {"name": "a", "kind": "module", "stats": ["act_max"]}]
    run = _synthetic({("a", "act_max"): a, ("b", "act_max"): b}, layers_meta=meta)
    fig = plots.heatmap_figure(run, "act_max", max_cols=100)
    hm = fig.data[0]
    assert list(hm.y) == ["b", "a"] and len(hm.x) <= 100
    assert np.nanmax(np.array(hm.customdata, dtype=float)[1]) == 1e4
    marks = fig.data[1]
    assert marks.name == "non-finite" and list(marks.y) == ["b"] and marks.text[0] == "NaN"


# -- attention lines ------------------------------------------------------------------------


def _hlines(fig):
    return [s.y0 for s in fig.layout.shapes if s.type == "line" and s.y0 == s.y1]


def test_attention_lines_and_the_fp16_limit(incident):
    _, run = incident
    fig = plots.attention_figure(run)
    names = [t.name for t in fig.data if "rolled back" not in t.name]
    # the layer the verdict names (h.1.attn) is marked and drawn thicker
    assert names[:2] == ["h.0.attn", "▶ h.1.attn"]
    assert fig.data[names.index("▶ h.1.attn") + 1].line.width > fig.data[0].line.width
    assert _hlines(fig) == []  # small logits, dtype unknown: no limit drawn
    # fp16 with logits far below the limit: a line at 65504 would flatten them; the title says it
    fp16 = plots.attention_figure(run, dtype="float16")
    assert _hlines(fp16) == [] and "fp16 limit 65504 off the chart" in fp16.layout.title.text
    assert _hlines(plots.attention_figure(run, dtype="bfloat16")) == []
    with_bound = plots.attention_figure(run, bound=True)
    assert "h.0.attn (bound)" in [t.name for t in with_bound.data]
    # values approaching 65504 draw the limit whatever the dtype; inf is marked, not dropped
    hot = _synthetic({("h.0.attn", "attn_max"): np.array([10.0, 3e4, math.inf])})
    fig = plots.attention_figure(hot)
    assert _hlines(fig) == [plots.FP16_MAX]
    assert [t.text for t in fig.data if t.name == "non-finite"][0] == ("h.0.attn attn_max: +inf",)
    # the run's meta can say fp16
    hot.meta["compute_dtype"] = "torch.float16"
    cold = _synthetic({("h.0.attn", "attn_max"): np.array([1.0, 2.0])})
    cold.meta["compute_dtype"] = "torch.float16"
    assert _hlines(plots.attention_figure(cold)) == []
    assert "off the chart" in plots.attention_figure(cold).layout.title.text
    near = _synthetic({("h.0.attn", "attn_max"): np.array([1.0, 2e4])})
    assert _hlines(plots.attention_figure(near)) == [plots.FP16_MAX]


def test_attention_lines_show_the_rolled_back_branch(incident):
    run_dir, run = incident
    fig = plots.attention_figure(run)
    rolled = [t for t in fig.data if t.name == "h.1.attn (rolled back)"]
    assert len(rolled) == 1 and rolled[0].line.dash == "dot"
    with Store(run_dir, readonly=True) as store:
        every = store.layer_stats(effective=False, stats=["attn_max"])
    old = every[(every.attempt == 0) & (every.step > 20) & (every.layer == "h.1.attn")]
    assert list(rolled[0].x) == old["step"].tolist()
    assert list(rolled[0].y) == pytest.approx(old["value"].tolist())
    main = next(t for t in fig.data if t.name == "▶ h.1.attn")
    assert rolled[0].line.color == main.line.color


# -- events ---------------------------------------------------------------------------------


def test_events_table_lists_every_kind(incident):
    _, run = incident
    table = plots.events_figure(run).data[0]
    cols = dict(zip(table.header.values, table.cells.values))
    assert list(cols["kind"]) == ["verdict", "rollback", "blacklist", "skip_step", "restart"]
    details = dict(zip(cols["kind"], cols["details"]))
    assert details["verdict"].startswith("spike; loss; h.1.attn; onset 25 → detected 30")
    assert "30 → 20" in details["rollback"] and "20 samples blacklisted" in details["rollback"]
    assert "added 20" in details["blacklist"]
    assert "exit_code -9" in details["restart"]


# -- layouts --------------------------------------------------------------------------------


def test_shipped_layouts_are_valid_and_default_matches():
    default = json.loads(plots.layout_path("default").read_text())
    assert default == plots.DEFAULT_LAYOUT
    assert plots.layout_names() == ["attention", "deep", "default"]
    for path in sorted((REPO / "thermo" / "layouts").glob("*.json")):
        layout = plots.load_layout(path)
        assert layout["panels"]


def test_every_layout_panel_builds(incident):
    _, run = incident
    for name in plots.layout_names():
        for panel in plots.load_layout(name)["panels"]:
            assert plots.build_panel(run, panel).to_dict()["data"] is not None


@pytest.mark.parametrize("layout, message", [
    ({"panels": []}, "non-empty 'panels'"),
    ({"panels": [{"type": "pie"}]}, "panel 0 has type 'pie'"),
    ({"panels": [{"type": "heatmap", "stats": "x"}]}, "unknown keys ['stats']"),
    ({"panels": [{"type": "events"}], "refresh_s": 0}, "refresh_s must be a number > 0"),
    ({"panels": [{"type": "events"}], "colour": 1}, "unknown top-level keys"),
])
def test_bad_layouts_are_refused_clearly(tmp_path, layout, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(layout))
    with pytest.raises(ValueError, match=None) as err:
        plots.load_layout(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_nan_written_to_the_store_is_plotted_as_a_marker(tmp_path):
    with Store(tmp_path) as store:
        store.write([StepRecord(step=i, scalars={"loss": math.nan if i == 3 else 1.0 + i})
                     for i in range(6)])
    fig = plots.loss_figure(read_run(tmp_path), keys=("loss",))
    marks = [t for t in fig.data if t.name == "non-finite"]
    assert list(marks[0].x) == [3]
    assert marks[0].yaxis != fig.data[0].yaxis  # pinned to the top, whatever the scale


# -- defaults that show the signal ----------------------------------------------------------


def test_loss_panel_picks_log_where_values_span_decades():
    gn = np.ones(50)
    gn[40] = 8e3  # a grad-norm spike: on a linear axis the healthy curve is flat at 0
    run = _synthetic({("a", "act_max"): np.ones(50)},
                     scalars={"loss": np.linspace(3, 2.5, 50), "grad_norm": gn})
    fig = plots.loss_figure(run)
    assert fig.layout.yaxis.type == "linear" and fig.layout.yaxis2.type == "log"
    assert fig.layout.updatemenus[0].active == 1
    assert plots.loss_figure(run, log_y=False).layout.yaxis2.type == "linear"


def _with_events(run: Run, events: list[tuple]) -> Run:
    rows = [{"id": i + 1, "time": 1000.0 + i, "attempt": 0, "step": step, "kind": kind,
             "message": msg, "data": data} for i, (kind, step, msg, data) in enumerate(events)]
    run.events = pd.DataFrame(rows, columns=["id", "time", "attempt", "step", "kind", "message", "data"])
    return run


def test_close_verdict_labels_do_not_overlap_and_say_what_the_band_is():
    run = _synthetic({("h.1", "act_max"): np.ones(200)}, scalars={"loss": np.ones(200)})
    _with_events(run, [
        ("verdict", 100, "a", {"kind": "growth", "signal": "act_max", "layer": "h.1",
                               "onset_step": 60, "detection_step": 100}),
        ("verdict", 104, "b", {"kind": "spike", "signal": "loss", "layer": None,
                               "onset_step": 101, "detection_step": 104}),
    ])
    fig = plots.loss_figure(run, keys=("loss",))
    labels = [a for a in fig.layout.annotations if "onset" in (a.text or "")]
    assert len(labels) == 2
    assert labels[0].text == "growth act_max in h.1 · onset 60 → detected 100"
    assert labels[0].y != labels[1].y  # stacked, not printed over each other
    rects = [(s.x0, s.x1) for s in fig.layout.shapes if s.type == "rect"]
    assert (60, 100) in rects and (101, 104) in rects


# -- the verdict's layer, the rolled-back branch, deep models --------------------------------


def test_heatmap_marks_the_verdicts_layer_and_shows_the_rolled_back_branch(incident):
    run_dir, run = incident
    fig = plots.heatmap_figure(run, "attn_max")
    main, branch = [t for t in fig.data if t.type == "heatmap"]
    assert list(main.y) == ["h.0.attn", "h.1.attn"]
    assert list(fig.layout.yaxis.ticktext) == ["h.0.attn", "▶ h.1.attn"]
    outlines = [s for s in fig.layout.shapes if s.type == "rect" and s.yref == "y"]
    assert [(s.y0, s.y1) for s in outlines] == [(0.5, 1.5)]
    assert any(a.text == "verdict: spike" and a.x == 30 for a in fig.layout.annotations)
    # the second strip is attempt 0's abandoned steps, the ones that diverged
    with Store(run_dir, readonly=True) as store:
        every = store.layer_stats(effective=False, stats=["attn_max"])
    old = every[(every.attempt == 0) & (every.step > 20)]
    assert branch.yaxis == "y2" and list(branch.x) == sorted(old["step"].unique())
    v = old[(old.layer == "h.1.attn") & (old.step == branch.x[0])]["value"].iloc[0]
    assert branch.customdata[1][0] == pytest.approx(v)
    assert len(plots.heatmap_figure(run, "attn_max", rolled_back=False).data) == 1
    # act_max has no row h.1.attn: the modules inside it are marked, not the block around it
    act = plots.heatmap_figure(run, "act_max")
    assert [t for t in act.layout.yaxis.ticktext if t.startswith("▶")] == [
        "▶ h.1.attn.c_attn", "▶ h.1.attn.c_proj"]
    assert sum(1 for a in act.layout.annotations if (a.text or "").startswith("verdict")) == 1


def _deep_run(n_blocks: int = 30) -> Run:
    values, meta = {}, []
    for b in range(n_blocks):
        for t in ("", ".attn.c_attn", ".attn.c_proj", ".mlp.c_fc", ".mlp.c_proj", ".ln_1", ".ln_2"):
            name = f"h.{b}{t}"
            arr = np.full(20, 1.0 + b)
            if name == "h.17.mlp.c_fc":
                arr[15] = 5e3
            values[(name, "act_max")] = arr
            meta.append({"name": name, "kind": "module", "stats": ["act_max"]})
    return _synthetic(values, layers_meta=meta)


def test_deep_heatmap_groups_by_block_filters_by_type_and_picks_the_hottest():
    run = _deep_run()
    fig = plots.heatmap_figure(run)  # 210 layers: one row per block by default
    hm = fig.data[0]
    assert list(hm.y) == [f"h.{b}" for b in range(30)]
    assert np.nanmax(np.array(hm.customdata, dtype=float)[17]) == 5e3  # the block keeps its max
    assert fig.layout.height <= 1400
    every = plots.heatmap_figure(run, group="layer")
    assert len(every.data[0].y) == 210
    mlp = plots.heatmap_figure(run, group="layer", types=["mlp.c_fc"]).data[0]
    assert list(mlp.y) == [f"h.{b}.mlp.c_fc" for b in range(30)]
    attn = plots.heatmap_figure(run, group="layer", types="attn").data[0]
    assert len(attn.y) == 60 and all(".attn." in n for n in attn.y)
    hot = plots.heatmap_figure(run, top=3).data[0]
    assert len(hot.y) == 3 and set(hot.y) == {"h.17.mlp.c_fc", "h.29", "h.29.attn.c_attn"}
    with pytest.raises(ValueError, match="group"):
        plots.heatmap_figure(run, group="rows")


def test_module_types_and_blocks():
    from thermo.plots.shared import block_of, module_type

    assert block_of("h.3.attn.c_attn") == "h.3" and module_type("h.3.attn.c_attn") == "attn.c_attn"
    assert module_type("h.3") == "block" and block_of("lm_head") is None
    assert module_type("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"


# -- the story -------------------------------------------------------------------------------


def test_story_names_verdict_cause_layer_and_what_thermo_did():
    run = _synthetic({("h.1", "act_max"): np.ones(80)}, scalars={"loss": np.ones(80)})
    _with_events(run, [
        ("verdict", 30, "growth", {"kind": "growth", "signal": "act_max", "layer": "h.1",
                                   "onset_step": 25, "detection_step": 30, "cause": "data"}),
        ("rollback", 30, "rolled back", {"from_step": 30, "to_step": 20, "n_blacklisted": 80,
                                         "action": "rollback"}),
        ("blacklist", 30, "bl", {"added": list(range(80))}),
        ("verdict", 70, "growth again", {"kind": "growth", "signal": "act_max", "layer": "h.1",
                                         "onset_step": 60, "detection_step": 70,
                                         "cause": {"kind": "optimizer", "detail": "reproduces without the samples"}}),
        ("give_up", 70, "thermo gave up", {"reason": "2 rollbacks (max_rollbacks=1)"}),
    ])
    story = plots.run_story(run, now=2000.0)
    assert story.status == "gave up" and story.exit_code != 0
    assert story.status_line == "gave up at step 70: 2 rollbacks (max_rollbacks=1)"
    first, second = story.incidents
    assert first.line == ("step 30: growth of act_max in h.1 (onset 25, cause: data) → "
                          "rolled back to step 20; blacklisted 80 samples")
    assert second.line.endswith("(onset 60, cause: optimizer — reproduces without the samples) → "
                                "gave up: 2 rollbacks (max_rollbacks=1)")
    html = plots.headline_html(story)
    assert 'id="thermo-run-status"' in html and ">gave up<" in html and "2 verdicts" in html


def test_story_status_training_finished_idle():
    run = _synthetic({("h.1", "act_max"): np.ones(10)}, scalars={"loss": np.ones(10),
                                                                  "wall_time": 1000.0 + np.arange(10)})
    assert plots.run_story(run, now=1010.0).status == "training"
    idle = plots.run_story(run, now=1009.0 + 3600)
    assert idle.status == "idle" and "no new step for 60 min" in idle.status_line
    _with_events(run, [("supervise", 9, "thermo supervise finished", {"status": "finished"})])
    assert plots.run_story(run, now=5000.0).status == "finished"
    # a give-up the supervisor recovered from (restart after it) is not the end
    _with_events(run, [("give_up", 5, "guard gave up", {"reason": "r"}),
                       ("restart", 5, "restart 1", {"reason": "divergence"})])
    assert plots.run_story(run, now=1010.0).status == "training"
    empty = _synthetic({("h.1", "act_max"): np.array([])}, scalars={"loss": np.array([])})
    assert plots.run_story(empty).status == "empty"


def test_story_takes_the_cause_the_replay_put_on_the_rollback():
    run = _synthetic({("h.1", "act_max"): np.ones(40)}, scalars={"loss": np.ones(40)})
    _with_events(run, [
        ("verdict", 30, "spike", {"kind": "spike", "signal": "loss", "layer": None,
                                  "onset_step": 28, "detection_step": 30}),
        ("rollback", 30, "rolled back", {"from_step": 30, "to_step": 20, "n_blacklisted": 2,
                                         "suspects": 24, "cause": "data", "action": "rollback",
                                         "replay": {"cause": "data", "summary": "samples 7 and 9 carry it"}}),
    ])
    (inc,) = plots.run_story(run, now=1010.0).incidents
    assert inc.line == ("step 30: spike of loss (onset 28, cause: data — samples 7 and 9 carry it) → "
                        "rolled back to step 20; blacklisted 2 of 24 suspect samples")


def test_layer_figure_for_a_layer_and_for_a_parent_of_modules(incident):
    run_dir, run = incident
    fig = plots.layer_figure(run, "h.1.attn")
    assert fig.layout.title.text == "layer h.1.attn"
    names = [t.name for t in fig.data]
    assert names[:2] == ["attn_max", "attn_max (rolled back)"]
    with Store(run_dir, readonly=True) as store:
        eff = store.layer_stats(stats=["attn_max"])
    mine = eff[eff.layer == "h.1.attn"]
    assert list(fig.data[0].x) == mine["step"].tolist()
    # a name that records nothing itself (a parent module) shows its modules' extreme
    deep = _deep_run(18)
    agg = plots.layer_figure(deep, "h.17.mlp")
    assert agg.layout.title.text == "layer h.17.mlp (extreme over its modules)"
    # the max of h.17.mlp.c_fc (with its spike at step 15) and h.17.mlp.c_proj
    assert list(agg.data[0].y) == [18.0] * 15 + [5e3] + [18.0] * 4


@pytest.mark.parametrize("crash", [False, True])
def test_a_run_closed_by_its_loop_is_finished_and_one_closed_by_an_exception_is_not(tmp_path, crash):
    import torch

    import thermo
    from thermo.plots.story import run_story

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(RuntimeError) if crash else contextlib.nullcontext():
        with thermo.Thermometer(model, run_dir=tmp_path / "r", flush_every=2) as therm:
            for step in range(4):
                model(torch.randn(2, 4)).sum().backward()
                therm.step(torch.tensor(1.0))
                if crash and step == 2:
                    raise RuntimeError("the loop died")
    story = run_story(thermo.load(tmp_path / "r"), now=1e12)  # long after: not "training"
    assert (story.status == "finished") is not crash
    assert story.status == ("idle" if crash else "finished")
