"""Preemption: SIGTERM or SIGUSR1 make the Guard checkpoint a step boundary on every rank and exit
with EXIT_PREEMPTED; the checkpoint is pending until healthy steps follow it after the relaunch;
`thermo supervise` relaunches such an exit without spending its restart budget, and stops
cleanly when it gets the signal itself."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import thermo
from tests.distributed import ROOT
from tests.reference import forbid_host_syncs
from thermo.checkpoints import CheckpointConfig
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.data import ResumableSampler
from thermo.guard import EXIT_PREEMPTED, Guard, GuardConfig, Preempted
from thermo.guard import preempt
from thermo.supervisor import Supervisor, SupervisorConfig
from thermo.thermometer import ThermometerConfig

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--checkpoint-every", "20", "--good-after", "20", "--flush-every", "10",
        "--attn-every", "5", "--warmup", "10", "--quiet"]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def manifest(run_dir) -> dict[int, dict]:
    return {e["step"]: e for e in json.loads((run_dir / "manifest.json").read_text())["checkpoints"]}


def events(run_dir, kind: str) -> list[dict]:
    ev = thermo.load(run_dir).events
    return list(ev[ev["kind"] == kind]["data"])


def ledger(run_dir) -> dict[int, list[int]]:
    with thermo.Store(run_dir, readonly=True) as s:
        return s.ledger()


def tiny_loop(run_dir, steps: int, signal_at: int = 0, sig: int = signal.SIGTERM) -> torch.nn.Module:
    """A small regression under the Guard; at the start of step `signal_at` the process sends
    itself `sig`, as a scheduler would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    g = torch.Generator().manual_seed(1)
    x_all, y_all = torch.randn(256, 8, generator=g), torch.randn(256, 1, generator=g)
    guard = Guard(model, opt, run_dir, data=ResumableSampler(256, 16), fetch=lambda ids: (x_all[ids], y_all[ids]),
                  config=GuardConfig(checkpoint_every=10),
                  thermometer=ThermometerConfig(flush_every=5, attention=False),
                  checkpoints=CheckpointConfig(good_after=10, keep_last=10))
    with guard:
        for step, (x, y) in guard.batches(max_steps=steps):
            if step == signal_at:
                os.kill(os.getpid(), sig)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.after_backward(loss)
            opt.step()
            guard.after_step()
            opt.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_checkpoints_the_step_and_exits_and_the_relaunch_goes_on_exactly(tmp_path, sig):
    before = signal.getsignal(sig)
    with pytest.raises(Preempted) as e:
        tiny_loop(tmp_path / "cut", 40, signal_at=7, sig=sig)
    # One process: the step in progress is the boundary.
    assert e.value.code == EXIT_PREEMPTED == 87 and e.value.step == 7
    assert signal.getsignal(sig) is before, "the Guard's handler outlived it"
    assert manifest(tmp_path / "cut")[7]["health"] == "pending"
    (pre,) = events(tmp_path / "cut", "preempt")
    assert (pre["checkpoint"], pre["signal"], pre["exit_code"]) == (7, signal.Signals(sig).name, 87)
    assert sorted(ledger(tmp_path / "cut")) == list(range(1, 8)), "what step 7 read is recorded"

    resumed = tiny_loop(tmp_path / "cut", 40)
    whole = tiny_loop(tmp_path / "whole", 40)
    # The checkpoint held everything: the relaunched run is the uninterrupted one, bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), whole.parameters()))
    assert ledger(tmp_path / "cut") == ledger(tmp_path / "whole")
    # Good only once healthy steps followed it in the relaunched run (good_after=10).
    assert manifest(tmp_path / "cut")[7]["health"] == "good"
    assert thermo.load(tmp_path / "cut").attempts["start_step"].tolist() == [-1, 7]


def test_the_guard_can_be_told_to_leave_the_signals_alone(tmp_path):
    with pytest.raises(ValueError, match="preempt_signals"):
        GuardConfig(preempt_signals=("SIGKILL",))
    before = signal.getsignal(signal.SIGTERM)
    model = torch.nn.Linear(2, 1)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1, fused=True), tmp_path, data=ResumableSampler(8, 2),
                  fetch=lambda ids: ids, config=GuardConfig(preempt_signals=()))
    assert signal.getsignal(signal.SIGTERM) is before
    guard.close()


def test_outside_the_main_thread_no_handler_is_installed_and_a_warning_says_so():
    import threading

    before, caught = signal.getsignal(signal.SIGTERM), []

    def build():
        with pytest.warns(RuntimeWarning, match="outside the main thread") as w:
            preempt.Preemption(("SIGTERM",), "cpu")
        caught.extend(w)

    t = threading.Thread(target=build)
    t.start()
    t.join()
    assert caught and signal.getsignal(signal.SIGTERM) is before


def test_a_guard_dropped_without_close_does_not_leave_the_process_deaf():
    got = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        p = preempt.Preemption(("SIGUSR1",), "cpu")
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert p.signum == signal.SIGUSR1 and got == []
        del p
        gc.collect()
        os.kill(os.getpid(), signal.SIGUSR1)  # nobody will act on a note now: the old handler does
        time.sleep(0.01)
        assert got == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert got == [signal.SIGUSR1] * 2, "the old handler is back in place"
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_with_several_ranks_a_signal_is_read_only_at_a_boundary_and_one_rank_suffices(monkeypatch):
    """Between boundaries `due` makes no collective and reads nothing back to the host; at a
    boundary one all_reduce(MAX) brings another rank's signal, and the decision stays."""
    reduced = []

    def max_(t):  # what the other rank contributes: it got SIGUSR1, this one nothing
        reduced.append(int(t[0]))
        return t.fill_(int(signal.SIGUSR1))

    monkeypatch.setattr(preempt._dist, "initialized", lambda: True)
    monkeypatch.setattr(preempt._dist, "world_size", lambda: 2)
    monkeypatch.setattr(preempt._dist, "max_", max_)
    armed = forbid_host_syncs(monkeypatch, "between boundaries")
    p = preempt.Preemption((), "cpu")
    armed["on"] = True
    assert not any(p.due(boundary=False) for _ in range(100)) and reduced == []
    armed["on"] = False
    assert p.due(boundary=True) and p.decided == "SIGUSR1" and reduced == [0]
    assert p.due(boundary=False) and reduced == [0]  # decided once, for good


@pytest.mark.slow
def test_one_rank_signalled_both_checkpoint_the_same_step_and_the_supervisor_relaunches(tmp_path):
    """2 ranks (FSDP2) under torchrun under `thermo supervise --max-restarts 0`: only rank 1 gets
    SIGUSR1, at step 23. The flag is reduced at the next flush (step 30): both ranks checkpoint
    step 30 and exit 87 (torchrun says 1). Not a crash: the supervisor relaunches anyway."""
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
           "thermo.train_gpt", *TINY, "--shard", "fsdp", "--steps", "60", "--run-dir", str(run),
           "--preempt-at", "23", "--preempt-rank", "1", "--preempt-signal", "SIGUSR1", "--fault-once"]
    cfg = SupervisorConfig(max_restarts=0, poll=0.2, restart_delay=0.0, grace=20.0, status_every=0.0)
    out = Supervisor(run, cmd, cfg, env=ENV).run()
    assert out.status == "finished" and out.exit_code == 0, out.message
    assert [la.ending for la in out.launches] == ["preempted", "finished"]
    (pre,) = events(run, "preempt")
    assert (pre["checkpoint"], pre["signal"]) == (30, "SIGUSR1")
    (relaunch,) = [d for d in events(run, "restart") if d["reason"] == "preempted"]
    assert relaunch["checkpoint"] == 30
    ckpt = manifest(run)[30]
    assert ckpt["world_size"] == 2 and ckpt["health"] == "good"  # good after steps 31..50 were healthy
    assert thermo.load(run).attempts["start_step"].tolist() == [-1, 30]
    n = len(TokenDataset(stdlib_bytes(300000), 32))
    got = ledger(run)
    assert [got[s] for s in range(1, 61)] == ResumableSampler(n, 8).peek(60), "the stream went on"


@pytest.mark.slow
def test_a_supervisor_that_gets_the_signal_stops_after_the_command_checkpointed(tmp_path):
    """What a batch script's trap does before a time limit: SIGUSR1 to `thermo supervise`. It
    passes it on (SIGTERM to the command), the Guard checkpoints the step in progress, and the
    supervisor exits 128+SIGUSR1 with nothing counted as a crash. The requeued job resumes there."""
    run = tmp_path / "r"
    sup = subprocess.Popen(
        [sys.executable, "-m", "thermo.cli", "supervise", str(run), "--poll", "0.1", "--grace", "30", "--quiet",
         "--", sys.executable, "-m", "thermo.train_gpt", *TINY, "--steps", "400", "--run-dir", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **ENV), cwd=ROOT)
    deadline, step = time.time() + 120, 0
    while step < 15 and time.time() < deadline and sup.poll() is None:
        try:
            step = json.loads((run / "heartbeat.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    sup.send_signal(signal.SIGUSR1)
    _, err = sup.communicate(timeout=60)
    assert sup.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert "stopped by SIGUSR1" in err
    (pre,) = events(run, "preempt")
    assert pre["signal"] == "SIGTERM" and 15 <= pre["checkpoint"] < 400
    assert manifest(run)[pre["checkpoint"]]["health"] == "pending"
    assert sorted(ledger(run))[-1] == pre["checkpoint"]
