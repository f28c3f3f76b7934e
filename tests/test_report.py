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
from thermo.store import Store  # noqa: E402

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
