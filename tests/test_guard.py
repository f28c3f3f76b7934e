"""The Guard end to end on the reference loop: poisoned batches are caught, rolled back and
skipped, and the run ends where a clean run that never saw them ends; bad steps are skipped on the
device; it gives up clearly; broken run directories get clear errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import thermo
from thermo._io import RunDirError
from thermo.data import Blacklist, ResumableSampler
from thermo.guard import EXIT_DIVERGED, Guard, GuardConfig, _DeviceSkip
from thermo.train_gpt import main as train_main
from thermo.train_gpt import parse_args, train

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--checkpoint-every", "20", "--good-after", "20", "--flush-every", "10",
        "--attn-every", "5", "--lr", "3e-3", "--warmup", "10", "--quiet"]


def run(tmp_path, name, *extra, steps=160):
    return train(parse_args([*TINY, "--run-dir", str(tmp_path / name), "--steps", str(steps), *extra]))


def effective_ledger(run_dir):
    with thermo.Store(run_dir, readonly=True) as s:
        return s.ledger()


def test_poisoned_batches_are_rolled_back_and_skipped(tmp_path):
    guarded = run(tmp_path, "guarded", "--poison-steps", "90-92")
    assert guarded.rollbacks == 1
    (verdict,) = guarded.verdicts
    assert verdict["onset_step"] <= 92 <= verdict["detection_step"] <= 100
    events = thermo.load(tmp_path / "guarded").events
    rb = events[events["kind"] == "rollback"].iloc[0]["data"]
    assert rb["to_step"] < verdict["onset_step"] and rb["from_step"] >= verdict["detection_step"]
    skipped = set(rb["blacklisted"])
    poison = set()
    sampler = ResumableSampler(len(thermo.corpus.TokenDataset(thermo.corpus.stdlib_bytes(300000), 32)), 8)
    for batch in sampler.peek(92)[89:92]:
        poison.update(batch)
    assert poison <= skipped, "every poisoned sample must be blacklisted"
    assert poison <= Blacklist.load(tmp_path / "guarded").ids

    # The clean run: the same training, never seeing the skipped samples.
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    Blacklist(clean_dir).add(skipped, reason="the ids the guarded run skipped")
    clean = run(tmp_path, "clean")
    assert clean.rollbacks == 0 and clean.verdicts == []

    # After the rollback the guarded run reads exactly the clean run's stream, batch for batch.
    g_ledger, c_ledger = effective_ledger(tmp_path / "guarded"), effective_ledger(clean_dir)
    assert sorted(g_ledger) == sorted(c_ledger) == list(range(1, 161))
    assert all(g_ledger[s] == c_ledger[s] for s in range(1, 161))
    assert abs(guarded.final_loss - clean.final_loss) <= 0.02 * clean.final_loss

    # No spike left on the effective timeline after the restored step.
    s = thermo.load(tmp_path / "guarded").scalars
    after = s[s["step"] > rb["to_step"]]
    assert after["grad_norm"].max() < 10 * s[s["step"] <= rb["to_step"]]["grad_norm"].median()
    assert after["loss"].notna().all() and (after["skipped"] == 0).all()


def test_a_single_bad_step_is_skipped_on_the_device_without_rollback(tmp_path):
    """Rung 1 alone: one non-finite step is masked by the fused optimizer; no verdict."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    for fused in (True, False):
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused) if fused else \
            torch.optim.SGD(model.parameters(), lr=0.1)
        skip = _DeviceSkip(GuardConfig(), opt, list(model.parameters()), torch.device("cpu"))
        model(torch.randn(2, 4)).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        flag = skip(torch.tensor(float("nan")), torch.tensor(1.0))
        opt.step()
        opt.zero_grad()
        assert flag.item() == 1.0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), f"fused={fused}"
        model(torch.randn(2, 4)).sum().backward()
        flag = skip(torch.tensor(1.0), torch.tensor(1.0))
        opt.step()
        opt.zero_grad()
        assert flag.item() == 0.0
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        skip.remove()
        assert not hasattr(opt, "found_inf")


def test_spiking_steps_are_skipped_after_the_window_fills():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    skip = _DeviceSkip(GuardConfig(skip_window=16, skip_min_window=8, skip_z=6.0), opt,
                       list(model.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    flags = [skip(torch.tensor(2.0 + 0.01 * torch.randn((), generator=g).item()), torch.tensor(1.0)).item()
             for _ in range(12)]
    assert flags == [0.0] * 12
    assert skip(torch.tensor(50.0), torch.tensor(1.0)).item() == 1.0  # loss spike
    assert skip(torch.tensor(2.0), torch.tensor(1e3)).item() == 1.0  # grad-norm spike
    assert skip(torch.tensor(2.0), torch.tensor(1.0)).item() == 0.0


def test_gives_up_after_max_rollbacks_with_exit_code(tmp_path, capsys):
    # A learning rate of 5 from step 40 on diverges again after every rollback.
    code = train_main([*TINY, "--run-dir", str(tmp_path / "r"), "--steps", "200", "--diverge-lr", "5",
                       "--diverge-from", "40", "--max-rollbacks", "2"])
    assert code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "thermo gave up: 2 rollbacks (max_rollbacks=2)" in err and "try a lower learning rate" in err
    ev = thermo.load(tmp_path / "r").events
    assert list(ev["kind"]).count("rollback") == 2
    assert ev.iloc[-1]["kind"] == "give_up"
    # The replay put the cause on the optimizer both times: no sample blacklisted, the LR halved
    # at once each time.
    rb = ev[ev["kind"] == "rollback"]
    assert [d["cause"] for d in rb["data"]] == ["numerics", "numerics"]
    assert [d["lr_scale"] for d in rb["data"]] == [0.5, 0.25]
    assert len(thermo.Blacklist.load(tmp_path / "r")) == 0


def test_resume_after_a_kill_continues_the_same_stream(tmp_path):
    whole = run(tmp_path, "whole", steps=100)
    # The same run, SIGKILLed mid-way, then relaunched with --resume auto.
    cmd = [sys.executable, "-m", "thermo.train_gpt", *TINY, "--run-dir", str(tmp_path / "cut"), "--steps", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    beat = tmp_path / "cut" / "heartbeat.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(beat.read_text())["step"] >= 70:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(beat.read_text())["step"]
    assert 70 <= killed_at < 100
    resumed = run(tmp_path, "cut", steps=100)
    assert resumed.rollbacks == 0
    ev = thermo.load(tmp_path / "cut").events
    restart = ev[ev["kind"] == "restart"].iloc[0]["data"]["checkpoint"]
    assert restart == 20 * ((killed_at - 1) // 20)  # the newest checkpoint before the kill
    a, b = effective_ledger(tmp_path / "whole"), effective_ledger(tmp_path / "cut")
    assert all(a[s] == b[s] for s in range(1, 101))
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-5)


def test_deleted_checkpoint_falls_back_to_an_older_one(tmp_path):
    run(tmp_path, "r", steps=60)
    manifest = json.loads((tmp_path / "r/manifest.json").read_text())
    newest = max(manifest["checkpoints"], key=lambda e: e["step"])
    shutil.rmtree(tmp_path / "r" / newest["path"])  # deleted by hand
    with pytest.warns(Warning, match="unusable|missing|falling back"):
        resumed = run(tmp_path, "r", steps=80)
    assert resumed.steps == 80
    ev = thermo.load(tmp_path / "r").events
    assert f"resumed from checkpoint {newest['step'] - 20}" in list(ev["message"])


@pytest.mark.parametrize("broken", ["manifest.json", "blacklist.json"])
def test_corrupt_control_file_is_one_clear_error(tmp_path, broken):
    run(tmp_path, "r", steps=20)
    if broken == "blacklist.json":
        Blacklist(tmp_path / "r").add([1], reason="x")
    (tmp_path / "r" / broken).write_text("{ this is not json")
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    with pytest.raises(RunDirError, match=broken.replace(".", r"\.")):
        run(tmp_path, "r", steps=40)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before  # nothing lost
    assert len(thermo.load(tmp_path / "r").scalars) == 20


def test_impossible_config_names_the_field():
    with pytest.raises(ValueError, match="GuardConfig.skip_min_window"):
        GuardConfig(skip_window=8, skip_min_window=9)
    with pytest.raises(ValueError, match="GuardConfig.lr_backoff"):
        GuardConfig(lr_backoff=0.0)


@pytest.mark.parametrize("setting, match", [
    ({"thermometer": thermo.ThermometerConfig(sync_flush=False)}, r"ThermometerConfig.sync_flush=False cannot"),
    ({"thermometer": thermo.ThermometerConfig(grad_norm=False)}, r"ThermometerConfig.grad_norm=False cannot"),
    ({"checkpoints": thermo.CheckpointConfig(horizon=10)}, r"CheckpointConfig.horizon=10 is shorter .* >= \d+"),
])
def test_a_setting_the_guard_must_override_is_refused_not_replaced(tmp_path, setting, match):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), data=ResumableSampler(10, 2),
              fetch=lambda ids: ids, run_dir=tmp_path, **setting)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_unset_settings_get_what_the_guard_needs(tmp_path):
    model = torch.nn.Linear(2, 2)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), data=ResumableSampler(10, 2),
                  fetch=lambda ids: ids, run_dir=tmp_path, thermometer=thermo.ThermometerConfig(flush_every=5))
    try:
        assert guard.watch.therm.config.sync_flush is True and guard.watch.therm.config.flush_every == 5
        det = guard.watch.detector.config
        assert guard.watch.checkpoints.config.horizon == det.onset_lookback + guard.config.rollback_margin
    finally:
        guard.close()


def test_needs_a_run_dir(monkeypatch):
    monkeypatch.delenv("THERMO_RUN_DIR", raising=False)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="THERMO_RUN_DIR"):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), data=ResumableSampler(10, 2),
              fetch=lambda ids: ids)


def test_a_resumed_run_is_not_blind_for_a_warm_up(tmp_path):
    """After a restart the detector gets its history back from the store: a spike 5 steps after
    the resume is caught (a fresh detector would still be in its 20-step warm-up)."""
    run(tmp_path, "r", steps=60)
    resumed = run(tmp_path, "r", "--poison-steps", "65-67", "--skip-z", "0", steps=100)
    assert resumed.rollbacks == 1
    (verdict,) = resumed.verdicts
    assert verdict["onset_step"] == 65 and verdict["kind"] == "spike"


def test_a_divergence_in_the_last_partial_window_is_recorded(tmp_path):
    with pytest.warns(RuntimeWarning, match="the run ended diverging"):
        run(tmp_path, "r", "--poison-steps", "93-94", "--skip-z", "0", steps=95)
    ev = thermo.load(tmp_path / "r").events
    (msg,) = ev[ev["kind"] == "verdict"]["message"]
    assert msg.startswith("after the last step: grad_norm spike at step 93")


def test_what_a_checkpoint_holds_is_in_the_store_when_it_is_written(tmp_path):
    # checkpoint_every is not a multiple of flush_every: the Guard flushes before it saves, so a
    # crash right after the checkpoint loses no recorded step and no ledger row.
    from thermo.corpus import TokenDataset, stdlib_bytes
    from thermo.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    data = TokenDataset(stdlib_bytes(50_000), 16)
    guard = Guard(model, opt, tmp_path / "r", data=ResumableSampler(data, 4), fetch=data.batch,
                  config=GuardConfig(checkpoint_every=15), thermometer=thermo.ThermometerConfig(flush_every=10))
    seen = {}
    for step, (x, y) in guard.batches(max_steps=16):
        loss = model(x, y)[1]
        loss.backward()
        guard.after_backward(loss)
        opt.step()
        guard.after_step()
        opt.zero_grad(set_to_none=True)
        if step == 15:  # the checkpoint of step 15 is written: read the store as a crash would leave it
            with thermo.Store(tmp_path / "r", readonly=True) as store:
                seen = {"steps": sorted(r.step for r in store.records()), "ledger": sorted(store.ledger())}
    guard.close()
    assert 15 in [e.step for e in guard.checkpoints.entries]
    assert seen["steps"] == list(range(1, 16)) and seen["ledger"] == list(range(1, 16))
