"""`thermo demo`, the README's first command: it trains, diverges, recovers and reports."""

from __future__ import annotations

from click.testing import CliRunner

import thermo
from thermo.cli import main


def test_demo_recovers_and_writes_a_report(tmp_path):
    run_dir = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--quick", "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "verdict    grad_norm spike at step" in out
    assert "rollbacks  1;" in out and "samples, listed in" in out
    assert "cause      data: the replay blacklisted 6 of the" in out  # the six poisoned samples only
    report = (run_dir / "report.html").read_text()
    assert "plotly" in report.lower() and len(report) > 100_000  # plotly.js is inlined
    run = thermo.load(run_dir)
    kinds = list(run.events["kind"])
    assert kinds == ["verdict", "rollback"]
    rb = run.events.iloc[1]["data"]
    # The poisoned steps (73-75 for 120 steps) are inside the blacklisted window.
    assert rb["onset_step"] <= 75 and rb["to_step"] < rb["onset_step"]
    assert len(thermo.Blacklist.load(run_dir)) == rb["n_blacklisted"] == 6
    assert run.scalars["step"].max() == 120
    # A second demo never overwrites the first.
    res2 = CliRunner().invoke(main, ["demo", "--quick", "--steps", "30", "--run-dir", str(run_dir)])
    assert (tmp_path / "demo-2").is_dir()
    # 30 steps: the poison lands inside the detector's warm-up, so nothing is caught, and the demo
    # says so with a non-zero exit.
    assert res2.exit_code == 1 and "no divergence was detected" in res2.output
