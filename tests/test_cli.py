"""`thermo` command line: what a user reads, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import math

import pytest

from click.testing import CliRunner

from thermo.cli import main
from thermo.store import StepRecord, Store


def make_run(path):
    with Store(path) as s:
        s.write([
            StepRecord(step=i, scalars={"loss": 3.0 - 0.1 * i, "grad_norm": 1.0 + i},
                       layers={("h.0", "act_max"): 1.0 + i, ("h.1", "act_max"): 50.0 - i,
                               ("h.1.attn", "attn_max"): 7.0})
            for i in range(5)
        ] + [StepRecord(step=5, scalars={"loss": math.nan, "grad_norm": math.inf},
                        layers={("h.0", "act_max"): math.nan})])
        s.event("verdict", "loss non-finite at step 5", step=5)


def test_inspect_summarises_a_run(tmp_path):
    make_run(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "6 recorded, 0..5" in out
    assert "loss       last nan   min 2.6   max 3" in out
    assert "non-finite steps 1" in out
    lines = out.splitlines()
    hot = lines.index(next(l for l in lines if l.startswith("hottest layers")))
    # NaN is the hottest (it is what the reader must see first), then h.1 with peak 50.
    assert lines[hot + 2].split()[:2] == ["h.0", "nan"]
    assert lines[hot + 3].split()[:3] == ["h.1", "50", "46"]  # peak, then its latest value
    assert "[verdict] step 5: loss non-finite at step 5" in out


def test_inspect_other_stat(tmp_path):
    make_run(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), "--stat", "attn_max"])
    assert res.exit_code == 0 and "h.1.attn" in res.output



@pytest.mark.parametrize("args, message", [
    (["--stat", "bogus"], "no per-layer statistic 'bogus' recorded"),
    (["--top", "0"], "--top must be >= 1, got 0"),
])
def test_inspect_bad_options_are_one_line_exit_2(tmp_path, args, message):
    make_run(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), *args])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("thermo: error: ") and message in res.output
    assert "recorded: act_max, attn_max" in res.output or "--top" in args


def test_inspect_json_and_exit_status_of_a_run_that_gave_up(tmp_path):
    make_run(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["status"] == "training" and out["exit_code"] == 0
    assert (out["first_step"], out["last_step"], out["steps"]) == (0, 5, 6)
    assert out["scalars"]["loss"] == {"last": "nan", "min": pytest.approx(2.6), "max": 3.0,
                                      "nonfinite_steps": 1}
    assert out["hottest"][0] == {"layer": "h.0", "peak": "nan", "last": "nan"}
    assert out["verdicts"][0]["step"] == 5
    with Store(tmp_path) as s:
        s.event("verdict", "growth", step=5, kind="growth", signal="act_max", layer="h.1",
                onset_step=2, detection_step=5, cause="data")
        s.event("give_up", "thermo gave up", step=5, reason="3 rollbacks (max_rollbacks=2)")
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), "--json"])
    out = json.loads(res.output)
    assert res.exit_code == 1 and out["status"] == "gave up" and out["exit_code"] == 1
    assert out["verdicts"][-1]["cause"] == "data"
    assert out["verdicts"][-1]["actions"] == ["gave up: 3 rollbacks (max_rollbacks=2)"]
    text = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert text.exit_code == 1
    assert "status     gave up at step 5: 3 rollbacks (max_rollbacks=2)" in text.output
    assert ("  verdict  step 5: growth of act_max in h.1 (onset 2, cause: data) → gave up: "
            "3 rollbacks (max_rollbacks=2)") in text.output


def test_inspect_bad_run_dir_is_one_clear_line(tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 2
    assert res.output.strip().startswith("thermo: error: no metrics store at")
    assert "Traceback" not in res.output
    (tmp_path / "thermo.db").write_text("garbage" * 100)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code == 2 and "is not a thermo metrics store" in res.output


def test_help_reads_well():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "inspect" in res.output
    res = CliRunner().invoke(main, ["inspect", "--help"])
    assert "Summarise a run" in res.output and "--stat" in res.output


def test_inspect_a_real_run_with_a_rollback(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import _viz

    run_dir = _viz.shared_incident_run(tmp_path_factory)
    res = CliRunner().invoke(main, ["inspect", str(run_dir), "--json", "--stat", "attn_max", "--top", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["verdicts"][0]["line"] == ("step 30: spike of loss in h.1.attn (onset 25) → rolled back to "
                                          "step 20; blacklisted 20 samples")
    assert (out["first_step"], out["last_step"], out["attempts"]) == (0, 45, 2)
    assert len(out["hottest"]) == 1 and out["hottest"][0]["layer"] in ("h.0.attn", "h.1.attn")
    res = CliRunner().invoke(main, ["inspect", str(run_dir), "--stat", "bogus"])
    assert res.exit_code == 2 and "recorded: act_max, act_min, attn_bound, attn_max" in res.output
