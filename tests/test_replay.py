"""Cause attribution by replay (thermo/guard/replay.py), on the reference loop: a poison that
follows the samples is traced to exactly those samples, a pair toxic only together is found by
bisection, a too-high learning rate blacklists nothing, a fault that does not come back blacklists
nothing, and the stream after the replay is a clean run's."""

from __future__ import annotations

import pytest

import thermo
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.data import Blacklist, ResumableSampler
from thermo.guard import DivergenceError
from thermo.train_gpt import parse_args, train

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--checkpoint-every", "20", "--good-after", "20", "--flush-every", "10",
        "--attn-every", "5", "--lr", "3e-3", "--warmup", "10", "--quiet"]


def run(run_dir, *extra, steps=100):
    return train(parse_args([*TINY, "--run-dir", str(run_dir), "--steps", str(steps), *extra]))


def batches(n):
    """The global batches a clean run reads at steps 1..n."""
    data = TokenDataset(stdlib_bytes(300000), 32)
    return ResumableSampler(len(data), 8, seed=0).peek(n)


def rollbacks(run_dir):
    ev = thermo.load(run_dir).events
    return [e for e in ev[ev["kind"] == "rollback"]["data"]]


def test_poison_that_follows_samples_blacklists_exactly_those_samples(tmp_path):
    # Two of the eight samples of steps 50-52 carry a 1e4-scaled gradient; dropout makes the RNG
    # state part of what must match a clean run.
    extra = ["--poison-steps", "50-52", "--poison-per-batch", "2", "--dropout", "0.1"]
    guarded = run(tmp_path / "guarded", *extra)
    toxic = {i for b in batches(52)[49:52] for i in b[:2]}
    (rb,) = rollbacks(tmp_path / "guarded")
    assert rb["cause"] == "data"
    assert set(rb["blacklisted"]) == toxic and rb["n_blacklisted"] == 6
    assert set(Blacklist.load(tmp_path / "guarded").ids) == toxic  # no innocent sample
    assert rb["suspects"] > len(toxic)  # the window the old rule blacklisted whole
    replay = rb["replay"]
    assert replay["steps_replayed"] >= rb["detection_step"] - rb["to_step"]
    assert replay["seconds"] > 0 and replay["evals"] > 0 and replay["peak_memory_mb"] > 0
    assert {a["step"] for a in replay["anomalies"]} == {50, 51, 52}
    assert all(a["how"] == "samples" for a in replay["anomalies"])

    # A clean run that never saw the toxic samples: after the rollback the guarded run reads its
    # stream batch for batch and, with the RNG restored, trains to the same loss.
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    Blacklist(clean_dir).add(toxic, reason="the toxic samples")
    clean = run(clean_dir, "--dropout", "0.1")
    assert clean.rollbacks == 0
    with thermo.Store(tmp_path / "guarded", readonly=True) as g, thermo.Store(clean_dir, readonly=True) as c:
        assert g.ledger() == c.ledger()
    assert guarded.final_loss == pytest.approx(clean.final_loss, rel=1e-6)


def test_samples_toxic_only_together_are_found_by_bisection(tmp_path):
    b = batches(60)
    pairs = [(b[49][1], b[49][5]), (b[50][0], b[50][6]), (b[51][2], b[51][3])]
    run(tmp_path / "r", "--poison-pairs", ",".join(f"{x}:{y}" for x, y in pairs))
    (rb,) = rollbacks(tmp_path / "r")
    assert rb["cause"] == "data"
    assert set(rb["blacklisted"]) == {i for p in pairs for i in p}
    assert {a["how"] for a in rb["replay"]["anomalies"]} == {"bisection"}


def test_a_too_high_learning_rate_blacklists_nothing(tmp_path):
    try:  # whether the backed-off LR saves the run depends on the machine's rounding; either way:
        run(tmp_path / "r", "--diverge-lr", "0.3", "--diverge-from", "40", "--max-rollbacks", "2")
    except DivergenceError:
        pass
    rbs = rollbacks(tmp_path / "r")
    assert rbs and all(rb["cause"] == "numerics" for rb in rbs)
    assert all(rb["n_blacklisted"] == 0 for rb in rbs)
    assert len(Blacklist.load(tmp_path / "r")) == 0
    # The optimizer's remedy: the LR backs off at the first numerics cause.
    assert rbs[0]["lr_scale"] == 0.5


def test_a_fault_that_does_not_come_back_blacklists_nothing(tmp_path):
    summary = run(tmp_path / "r", "--transient-steps", "50-52")
    (rb,) = rollbacks(tmp_path / "r")
    assert rb["cause"] == "transient" and rb["n_blacklisted"] == 0
    assert rb["replay"]["hosts"] and rb["lr_scale"] == 1.0
    assert len(Blacklist.load(tmp_path / "r")) == 0
    assert summary.steps == 100


def test_without_replay_the_window_is_blacklisted_and_a_give_up_takes_it_back(tmp_path):
    with pytest.raises(DivergenceError):
        run(tmp_path / "r", "--no-replay", "--diverge-lr", "0.3", "--diverge-from", "40", "--max-rollbacks", "1",
            "--max-blacklist-fraction", "1", steps=140)
    rbs = rollbacks(tmp_path / "r")
    assert rbs[0]["cause"] is None and rbs[0]["n_blacklisted"] > 0
    ev = thermo.load(tmp_path / "r").events
    give_up = ev[ev["kind"] == "give_up"].iloc[0]["data"]
    assert give_up["released"] == rbs[0]["n_blacklisted"]
    assert len(Blacklist.load(tmp_path / "r")) == 0  # nothing stays that was not found toxic


def test_a_blacklist_over_the_cap_gives_up_with_a_clear_message(tmp_path):
    with pytest.raises(DivergenceError, match=r"over max_blacklist_fraction=0.001") as err:
        run(tmp_path / "r", "--no-replay", "--poison-steps", "50-52", "--max-blacklist-fraction", "0.001")
    assert "raise GuardConfig.max_blacklist_fraction" in str(err.value)
    assert len(Blacklist.load(tmp_path / "r")) == 0  # refused before anything was added


def test_a_loss_fn_the_replay_cannot_run_falls_back_to_the_window_with_a_warning(tmp_path):
    import torch

    from thermo.gpt import GPT, GPTConfig
    from thermo.guard import Guard, GuardConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    data = TokenDataset(stdlib_bytes(50_000), 16)
    toxic = {i for b in ResumableSampler(data, 4).peek(42)[39:42] for i in b}

    def fetch(ids):  # the poison is in the samples: a NUL byte first
        x, y = data.batch(ids)
        x[[k for k, i in enumerate(ids) if i in toxic], 0] = 0
        return x, y

    def loss_fn(batch):  # like a model with BatchNorm in train mode: no batch of one
        x, y = batch
        if len(x) < 2:
            raise ValueError("Expected more than 1 value per channel when training")
        _, loss = model(x, y)
        return loss * torch.where((x[:, 0] == 0).any(), 1e4, 1.0)

    guard = Guard(model, opt, tmp_path / "r", data=ResumableSampler(data, 4), fetch=fetch, loss_fn=loss_fn,
                  config=GuardConfig(checkpoint_every=10, max_blacklist_fraction=1.0))
    with pytest.warns(RuntimeWarning, match="the replay failed.*GuardConfig\\(replay=False\\)"):
        for step, batch in guard.batches(max_steps=60):
            loss = loss_fn(batch)
            loss.backward()
            guard.after_backward(loss)
            opt.step()
            guard.after_step()
            opt.zero_grad(set_to_none=True)
    guard.close()
    (rb,) = rollbacks(tmp_path / "r")
    assert rb["cause"] == "unattributed" and rb["n_blacklisted"] == rb["suspects"] > 0
    assert toxic <= set(Blacklist.load(tmp_path / "r").ids)
