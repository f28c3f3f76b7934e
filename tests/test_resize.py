"""A run resumed on another number of ranks (2 -> 1 -> 2, torchrun, gloo) under FSDP2 and ZeRO-1:
the checkpoint reshards, the global sample stream goes on where it stopped, the blacklist holds,
and the history continues in the same store, as one uninterrupted single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import thermo
from tests.distributed import ROOT
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.data import Blacklist, ResumableSampler
from thermo.guard import EXIT_PREEMPTED
from thermo.train_gpt import parse_args, train

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--checkpoint-every", "25", "--good-after", "20", "--flush-every", "10",
        "--attn-every", "5", "--warmup", "10", "--steps", "60", "--quiet"]
AHEAD = (36, 37)  # clean steps whose samples are blacklisted between the first and second launch


def clean_stream(steps: int, blacklist=()) -> list[list[int]]:
    n = len(TokenDataset(stdlib_bytes(300000), 32))
    return ResumableSampler(n, 8, blacklist=set(blacklist)).peek(steps)


def launch(run_dir, nproc: int, *extra) -> subprocess.CompletedProcess:
    """The reference loop on `nproc` ranks; it may end preempted (torchrun reports that as 1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "thermo.train_gpt", *TINY, "--run-dir", str(run_dir), *map(str, extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
                          start_new_session=True)
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    return proc


def manifest(run_dir) -> dict[int, dict]:
    return {e["step"]: e for e in json.loads((run_dir / "manifest.json").read_text())["checkpoints"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One process, no torchrun, the same blacklist from the start: the run to match."""
    run_dir = tmp_path_factory.mktemp("whole")
    Blacklist(run_dir).add([i for s in AHEAD for i in clean_stream(s)[-1]], reason="as the resized run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks ran
    try:
        train(parse_args([*TINY, "--run-dir", str(run_dir)]))
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["fsdp", "zero1"])
def test_two_ranks_to_one_and_back_continue_the_same_run(tmp_path, shard, uninterrupted):
    run_dir = tmp_path / "r"
    # 2 ranks, preempted at step 13: both checkpoint the next flush, step 20.
    launch(run_dir, 2, "--shard", shard, "--preempt-at", 13)
    assert manifest(run_dir)[20]["world_size"] == 2
    # A blacklist written between launches (by the supervisor, or by hand) holds on any world size.
    toxic = [i for s in AHEAD for i in clean_stream(s)[-1]]
    Blacklist(run_dir).add(toxic, reason="found toxic")
    # 1 rank from checkpoint 20, preempted at step 33 (one process: that very step).
    launch(run_dir, 1, "--shard", shard, "--preempt-at", 33)
    assert manifest(run_dir)[33]["world_size"] == 1
    # 2 ranks again from checkpoint 33, to the end.
    out = launch(run_dir, 2, "--shard", shard)
    assert out.returncode == 0, out.stderr[-3000:]

    run = thermo.load(run_dir)
    ev = run.events
    assert [(d["from_world_size"], d["to_world_size"]) for d in ev[ev["kind"] == "resize"]["data"]] == [(2, 1), (1, 2)]
    assert [d["checkpoint"] for d in ev[ev["kind"] == "preempt"]["data"]] == [20, 33]
    # One store, three attempts: each launch continued from the checkpoint it resumed.
    assert run.attempts["start_step"].tolist() == [-1, 20, 33]
    # The sample stream is the uninterrupted run's, batch for batch; the blacklisted samples
    # were never read.
    with thermo.Store(run_dir, readonly=True) as s:
        ledger = s.ledger()
    expected = clean_stream(60, toxic)
    assert sorted(ledger) == list(range(1, 61))
    assert [ledger[s] for s in range(1, 61)] == expected
    with thermo.Store(uninterrupted, readonly=True) as s:
        assert s.ledger() == ledger
    assert not set(toxic) & {i for ids in ledger.values() for i in ids}
    # Model and optimizer state resharded, not restarted: the loss follows the single-process run.
    a = run.scalars.set_index("step")["loss"]
    b = thermo.load(uninterrupted).scalars.set_index("step")["loss"]
    rel = ((a - b).abs() / b).max()
    assert rel < 1e-4, f"the resized run left the uninterrupted one by {rel:.2e}"
    # The preemption checkpoints were pending when written and turned good after healthy steps.
    health = {s: e["health"] for s, e in manifest(run_dir).items()}
    assert health.get(33) == "good", health
