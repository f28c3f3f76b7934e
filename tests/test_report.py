"""thermo/report.py: one HTML file that opens offline and shows every panel."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _viz  # noqa: E402

from thermo import plots  # noqa: E402
from thermo.cli import main  # noqa: E402
from thermo.report import write_report  # noqa: E402
from thermo.dashboard import read_run  # noqa: E402
from thermo.store import StepRecord, Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run_dir = _viz.shared_incident_run(tmp_path_factory)
    return run_dir, write_report(run_dir, tmp / "out" / "report.html")


def test_report_is_self_contained(report):
    _, path = report
    page = path.read_text()
    # plotly.js is in the page exactly once, and nothing is loaded from elsewhere
    assert page.count("* plotly.js v") == 1
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=", page)
    for i, panel in enumerate(plots.DEFAULT_LAYOUT["panels"]):
        assert f'id="panel-{i}-{panel["type"]}"' in page


@pytest.mark.browser
@pytest.mark.skipif(_viz.chromium() is None,
                    reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_report_opens_offline_in_chromium_with_every_panel(report, tmp_path):
    run_dir, path = report
    shot = tmp_path / "report.png"
    dom = _viz.load(path.as_uri(), screenshot=shot, size=(1100, 2600), offline=True)
    for i, panel in enumerate(plots.DEFAULT_LAYOUT["panels"]):
        html = _viz.section(dom, f"panel-{i}-{panel['type']}")
        assert "js-plotly-plot" in html and "main-svg" in html, f"panel {i} not drawn"
        if panel["type"] == "heatmap":
            assert "heatmaplayer" in html or "<image" in html
        if panel["type"] == "events":
            assert "rollback" in html and "verdict" in html
    with Store(run_dir, readonly=True) as store:
        last = max(store.records(effective=True), key=lambda r: r.step)
    assert _viz.element_text(dom, "thermo-last-step") == str(last.step)
    # the headline: what diverged, where, since when, and what thermo did
    assert _viz.element_text(dom, "thermo-run-status") == "finished"  # its loop closed the store
    assert ("step 30: spike of loss in h.1.attn (onset 25) → rolled back to step 20; "
            "blacklisted 20 samples") in _viz.section(dom, "thermo-headline")
    assert float(_viz.element_text(dom, "thermo-loss")) == pytest.approx(last.scalars["loss"], rel=1e-5)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report.png")
    assert shot.stat().st_size > 10_000


def test_cli_report(tmp_path, report):
    run_dir, _ = report
    out = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["report", str(run_dir), "-o", str(out),
                                    "--layout", "attention"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "wrote" in res.output
    assert 'id="panel-0-attention"' in out.read_text()


def test_cli_report_on_a_missing_run_is_one_clear_line(tmp_path):
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2
    assert "no metrics store" in res.output and "Traceback" not in res.output


def _gave_up_run(run_dir, n=30):
    with Store(run_dir) as s:
        s.write([StepRecord(step=i, scalars={"loss": 3.0 - 0.01 * i, "grad_norm": 1.0},
                            layers={("h.0", "act_max"): 1.0 + i, ("h.1", "act_max"): 2.0 * 1.2 ** i})
                 for i in range(n)])
        s.event("verdict", "act_max of h.1 grew", step=25, kind="growth", signal="act_max",
                layer="h.1", onset_step=12, detection_step=25, cause="optimizer")
        s.event("give_up", "thermo gave up: 2 rollbacks", step=25, reason="2 rollbacks (max_rollbacks=2)")
    return run_dir


@pytest.mark.browser
@pytest.mark.skipif(_viz.chromium() is None,
                    reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_report_of_a_run_that_gave_up_says_so_first(tmp_path):
    path = write_report(_gave_up_run(tmp_path / "run"), tmp_path / "r.html")
    dom = _viz.load(path.as_uri(), size=(1100, 1400), offline=True)
    assert _viz.element_text(dom, "thermo-run-status") == "gave up"
    assert _viz.element_text(dom, "thermo-status-line") == "gave up at step 25: 2 rollbacks (max_rollbacks=2)"
    assert ("step 25: growth of act_max in h.1 (onset 12, cause: optimizer) → gave up: 2 rollbacks "
            "(max_rollbacks=2)") in dom
    # the verdict's row is marked in the heatmap that chromium drew
    assert "▶ h.1" in _viz.section(dom, "panel-1-heatmap")


def test_cli_report_cdn_is_small_and_loads_plotly_from_the_cdn(tmp_path):
    out = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["report", str(_gave_up_run(tmp_path / "run")), "-o", str(out), "--cdn"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    from plotly.offline import get_plotlyjs_version

    assert f'<script src="https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"' in page
    assert "* plotly.js v" not in page and out.stat().st_size < 500_000


@pytest.mark.parametrize("name", ["thermo.db", "manifest.json", "notes.txt"])
def test_cli_report_refuses_to_overwrite_a_run_file(tmp_path, name):
    run_dir = _gave_up_run(tmp_path / "run")
    target = run_dir / name
    if not target.exists():
        target.write_text("keep me")
    before = target.read_bytes()
    res = CliRunner().invoke(main, ["report", str(run_dir), "-o", str(target)])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "refusing to write the report over" in res.output and "-o report.html" in res.output
    assert target.read_bytes() == before


def test_cli_report_compares_runs(tmp_path, report):
    incident, _ = report
    other = _gave_up_run(tmp_path / "other")
    out = tmp_path / "cmp.html"
    res = CliRunner().invoke(main, ["report", str(incident), str(other), "-o", str(out), "--cdn"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert 'id="panel-compare"' in page and 'id="run0-thermo-headline"' in page
    assert 'id="run1-thermo-run-status"' in page and ">gave up<" in page
    run = {str(incident): read_run(incident), str(other): read_run(other)}
    fig = plots.compare_figure(run)
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names == [str(incident), str(other)]
    # each run in its own colour, its rolled-back branch dotted in the same colour
    rolled = [t for t in fig.data if t.name == f"{incident} (rolled back)"]
    assert rolled and rolled[0].line.color == fig.data[0].line.color and rolled[0].line.dash == "dot"
    assert any(t.name == f"{other}: verdicts" and list(t.x) == [25] for t in fig.data)


_LINK_JS = r"""
(function () {
  var U = window.thermoUser, done = false;
  setInterval(function () {
    var loss = U.graph('panel-0-loss'), heat = U.graph('panel-1-heatmap'), attn = U.graph('panel-4-attention');
    if (done || !loss || !heat || !attn || !loss.__thermoRelayout || !heat.__thermoRelayout) return;
    done = true;
    U.zoom(loss, 0.2, 0.5);
    setTimeout(function () {
      U.report({loss: loss.layout.xaxis.range, heat: heat.layout.xaxis.range,
                heat2: heat.layout.xaxis2 && heat.layout.xaxis2.range, attn: attn.layout.xaxis.range});
    }, 500);
  }, 100);
})();
"""


@pytest.mark.browser
@pytest.mark.skipif(_viz.chromium() is None,
                    reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_zooming_one_report_panel_zooms_every_step_axis(report, tmp_path):
    _, path = report
    page = path.read_text().replace("</body>", f"<script>{_viz.USER_JS}{_LINK_JS}</script></body>")
    probe = tmp_path / "probe.html"
    probe.write_text(page)
    dom = _viz.load(probe.as_uri(), size=(1100, 2600), offline=True, budget_ms=8000)
    got = _viz.page_result(dom)
    assert got is not None, "the page never zoomed"
    lo, hi = got["loss"]
    assert 5 < lo < hi < 30, got  # a real zoom of the 0..45 step axis
    for other in ("heat", "heat2", "attn"):
        assert got[other] == pytest.approx(got["loss"]), (other, got)
