"""DeepSpeed adapter: ZeRO-2 on 2 real ranks (torchrun, gloo, CPU). A planted gradient spike is
detected, rolled back through the engine's own checkpoint and skipped, every rank acting
together, and the run ends bit-identical to a clean run that never saw the skipped samples."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

import thermo
from tests.distributed import ROOT, torchrun
from thermo.data import Blacklist


def test_missing_deepspeed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.delitem(sys.modules, "thermo.integrations.deepspeed", raising=False)
    with pytest.raises(ImportError, match=r"pip install thermo\[deepspeed\]"):
        importlib.import_module("thermo.integrations.deepspeed")


@pytest.mark.slow
def test_zero2_two_ranks_rollback_through_engine_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "out.json"
    torchrun(ROOT / "tests/dist/ds_guard.py", "--root", tmp_path, "--out", out, "--stage", "2",
             "--steps", "80", "--poison-steps", "50-52", "--snippets", ROOT / "README.md",
             timeout=300)
    res = json.loads(out.read_text())
    guarded, clean = res["guarded"], res["clean"]

    # Detected, rolled back once, on both ranks alike; the clean run never needed to.
    assert guarded["rollbacks"] == 1 and clean["rollbacks"] == 0
    r0, r1 = guarded["views"]
    assert r0["steps"] == r1["steps"] and r0["rollbacks"] == r1["rollbacks"] == 1
    assert r0["checksum"] == r1["checksum"]
    run = thermo.load(tmp_path / "guarded")
    ev = run.events
    assert list(ev["kind"]) == ["verdict", "rollback"]
    verdict, rb = ev.iloc[0]["data"], ev.iloc[1]["data"]
    assert verdict["signal"] == "grad_norm" and verdict["onset_step"] <= verdict["detection_step"] == 50  # first poisoned step, a flush
    assert rb["to_step"] < verdict["onset_step"] and rb["from_step"] >= verdict["detection_step"]
    steps = r0["steps"]
    back = steps.index(rb["to_step"] + 1, steps.index(rb["from_step"]))
    assert steps[:back] == list(range(1, rb["from_step"] + 1)) and steps[back:] == list(range(rb["to_step"] + 1, 81))

    # Every poisoned sample is blacklisted, and the skip is exact: the guarded run ends with the
    # very weights of a run that had those samples blacklisted from the start.
    assert set(res["poisoned"]) <= Blacklist.load(tmp_path / "guarded").ids
    assert r0["checksum"] == clean["views"][0]["checksum"]
    with thermo.Store(tmp_path / "guarded", readonly=True) as g, thermo.Store(tmp_path / "clean", readonly=True) as c:
        assert g.ledger() == c.ledger() and sorted(g.ledger()) == list(range(1, 81))

    # The store holds the per-layer keys and scalars; the grad norm is DeepSpeed's global one.
    assert {"loss", "grad_norm"} <= set(run.scalars.columns)
    assert {"h.0", "h.1.attn", "h.0.mlp.c_fc"} <= set(run.layers["layer"])
    assert {"act_max", "act_min", "grad_max", "attn_max"} <= set(run.layers["stat"])
    after = run.scalars[run.scalars["step"] > rb["to_step"]]
    assert after["grad_norm"].max() < 100

    # The checkpoints are DeepSpeed's own layout, one optimizer partition per rank, in the manifest.
    manifest = json.loads((tmp_path / "guarded" / "manifest.json").read_text())["checkpoints"]
    assert [e["step"] for e in manifest] == [40, 60, 80] and all(e["world_size"] == 2 for e in manifest)
    # The README's distributed snippets ran on both ranks, each to the end of its loop.
    assert res["snippets"] == {"FSDP2": 12, "ZeRO-1": 12, "DeepSpeed": 12}
    for name in ("fsdp", "zero1", "ds"):
        assert list(thermo.load(tmp_path / "runs" / name).scalars["step"]) == list(range(1, 13))
    folder = tmp_path / "guarded" / manifest[-1]["path"]
    assert sorted(p.name for p in folder.glob("*.pt")) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
