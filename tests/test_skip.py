"""Rung 1 skips truly: for Adam, AdamW and SGD (momentum, weight decay), fused, foreach and
for-loop, a skipped step leaves parameters and every optimizer state tensor bit-identical, a
normal step matches an unguarded optimizer exactly, nothing reads the device between flushes,
and every rank takes the same decision."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from tests.distributed import ROOT, torchrun
from tests.reference import forbid_host_syncs
from thermo.guard import GuardConfig, _DeviceSkip

OPTIMIZERS = {
    "Adam": lambda params, **kw: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1, **kw),
    "AdamW": lambda params, **kw: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **kw),
    "SGD": lambda params, **kw: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1, **kw),
}
IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def model_and_twin():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    return model, copy.deepcopy(model)


def backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(4, 8, generator=g)).square().mean()
    loss.backward()
    return loss


def state_tensors(opt):
    return [(i, k, v.clone()) for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            for k, v in sorted(opt.state.get(p, {}).items()) if isinstance(v, torch.Tensor)]


def assert_same(model_a, opt_a, model_b, opt_b, what):
    for (na, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), f"{what}: parameter {na} differs"
    sa, sb = state_tensors(opt_a), state_tensors(opt_b)
    assert [(i, k) for i, k, _ in sa] == [(i, k) for i, k, _ in sb], f"{what}: state keys differ"
    for (i, k, a), (_, _, b) in zip(sa, sb):
        assert torch.equal(a, b), f"{what}: state {k!r} of parameter {i} differs"


def guarded_step(skip, model, opt, seed, loss_override=None):
    loss = backward(model, seed)
    flag = skip(loss if loss_override is None else loss_override, torch.tensor(1.0))
    opt.step()  # the skip restores in the optimizer's step post-hook
    opt.zero_grad(set_to_none=True)
    return flag


def plain_step(model, opt, seed):
    backward(model, seed)
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_skipped_step_changes_nothing_and_normal_steps_match_an_unguarded_optimizer(name, impl):
    model, twin = model_and_twin()
    opt = OPTIMIZERS[name](model.parameters(), **IMPLS[impl])
    ref = OPTIMIZERS[name](twin.parameters(), **IMPLS[impl])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the snapshot's memory warning: tested below
        skip = _DeviceSkip(GuardConfig(skip_z=None), opt, list(model.parameters()), torch.device("cpu"))
    assert skip.mode == ("fused" if impl == "fused" else "snapshot")

    assert guarded_step(skip, model, opt, seed=1).item() == 0.0
    plain_step(twin, ref, seed=1)
    assert_same(model, opt, twin, ref, "after a normal step")

    before_p = [p.detach().clone() for p in model.parameters()]
    before_s = state_tensors(opt)
    assert guarded_step(skip, model, opt, seed=2, loss_override=torch.tensor(float("nan"))).item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before_p, model.parameters())), "a skipped step moved a parameter"
    after_s = state_tensors(opt)
    assert [(i, k) for i, k, _ in after_s] == [(i, k) for i, k, _ in before_s]
    for (i, k, a), (_, _, b) in zip(before_s, after_s):
        assert torch.equal(a, b), f"a skipped step changed state {k!r} of parameter {i}"

    # The reference never saw the skipped batch; the next steps agree bit for bit.
    for seed in (3, 4):
        guarded_step(skip, model, opt, seed=seed)
        plain_step(twin, ref, seed=seed)
    assert_same(model, opt, twin, ref, "after the skip and two more steps")
    skip.remove()
    assert not hasattr(opt, "found_inf")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_skipped_first_step_leaves_the_optimizer_as_if_it_had_not_run(name, impl):
    """The state does not exist before the first step (torch creates it lazily): a skipped first
    step leaves torch's initial state, and the run continues like one that never saw the batch."""
    model, twin = model_and_twin()
    opt = OPTIMIZERS[name](model.parameters(), **IMPLS[impl])
    ref = OPTIMIZERS[name](twin.parameters(), **IMPLS[impl])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skip = _DeviceSkip(GuardConfig(skip_z=None), opt, list(model.parameters()), torch.device("cpu"))
    guarded_step(skip, model, opt, seed=1, loss_override=torch.tensor(float("inf")))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    for seed in (2, 3):
        guarded_step(skip, model, opt, seed=seed)
        plain_step(twin, ref, seed=seed)
    assert_same(model, opt, twin, ref, "after a skipped first step and two more")


@pytest.mark.parametrize("name,impl", [("SGD", "fused"), ("AdamW", "foreach"), ("SGD", "for-loop")])
def test_a_skipped_first_step_after_the_state_was_emptied_is_exact_too(name, impl):
    """A rollback to the initial checkpoint empties the optimizer state (Guard._restore): the
    next first step is watched like the very first one (fused SGD's empty_like buffers; no stale
    snapshot of the emptied state put back)."""
    model, twin = model_and_twin()
    opt = OPTIMIZERS[name](model.parameters(), **IMPLS[impl])
    ref = OPTIMIZERS[name](twin.parameters(), **IMPLS[impl])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skip = _DeviceSkip(GuardConfig(skip_z=None), opt, list(model.parameters()), torch.device("cpu"))
    guarded_step(skip, model, opt, seed=1)
    guarded_step(skip, model, opt, seed=5)  # a snapshot taken while the state exists
    opt.state.clear()  # what restoring checkpoint 0 does
    with torch.no_grad():
        for a, b in zip(twin.parameters(), model.parameters()):
            a.copy_(b)
    guarded_step(skip, model, opt, seed=2, loss_override=torch.tensor(float("nan")))
    for seed in (3, 4):
        guarded_step(skip, model, opt, seed=seed)
        plain_step(twin, ref, seed=seed)
    assert_same(model, opt, twin, ref, "after a skipped first step on emptied state")


def test_zero_grad_mode_is_not_exact_for_adam_which_is_why_snapshot_exists():
    model, _ = model_and_twin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skip = _DeviceSkip(GuardConfig(skip_z=None, skip_mode="zero_grad"), opt, list(model.parameters()),
                           torch.device("cpu"))
    assert any("not exact" in str(w.message) for w in caught)
    guarded_step(skip, model, opt, seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    guarded_step(skip, model, opt, seed=2, loss_override=torch.tensor(float("nan")))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_auto_mode_states_the_snapshot_memory_and_suggests_the_fused_kernel():
    model, _ = model_and_twin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skip = _DeviceSkip(GuardConfig(), opt, list(model.parameters()), torch.device("cpu"))
    (w,) = [w for w in caught if "snapshot" in str(w.message)]
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert f"{3 * nbytes / 2**20:.3g} MiB" in str(w.message) and "fused=True" in str(w.message)
    guarded_step(skip, model, opt, seed=1)  # the state is created by the first step
    guarded_step(skip, model, opt, seed=2)
    n_tensors = len(list(model.parameters()))
    assert skip.extra_bytes == 3 * nbytes + 4 * n_tensors  # params, two moments, each fp32 `step`


def test_bad_skip_modes_are_clear_errors():
    with pytest.raises(ValueError, match="GuardConfig.skip_mode"):
        GuardConfig(skip_mode="exact")
    model, _ = model_and_twin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="skip_mode='fused'.*fused=True"):
        _DeviceSkip(GuardConfig(skip_mode="fused"), opt, list(model.parameters()), torch.device("cpu"))


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_no_host_sync_between_flushes(monkeypatch, impl):
    """The decision, the snapshot and the restore read nothing back to the host."""
    model, _ = model_and_twin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **IMPLS[impl])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skip = _DeviceSkip(GuardConfig(skip_window=4, skip_min_window=2), opt, list(model.parameters()),
                           torch.device("cpu"))
    skip._hook.remove()  # restore by hand below, armed: inside opt.step() torch itself may sync
    armed = forbid_host_syncs(monkeypatch)
    flags = []
    for seed in range(6):
        loss = backward(model, seed)
        if seed == 4:
            loss = loss * float("nan")
        armed["on"] = True
        flags.append(skip(loss, torch.tensor(1.0)).clone())
        armed["on"] = False
        opt.step()  # torch's for-loop/foreach AdamW reads its step count on the host: not ours
        armed["on"] = True
        skip.restore()
        armed["on"] = False
        opt.zero_grad(set_to_none=True)
    assert [f.item() for f in flags] == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_restore_runs_once_per_decision_in_the_step_post_hook():
    """A second restore (the Guard's after_step) or an optimizer step without a decision never
    puts back a stale snapshot."""
    model, _ = model_and_twin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skip = _DeviceSkip(GuardConfig(skip_z=None), opt, list(model.parameters()), torch.device("cpu"))
    guarded_step(skip, model, opt, seed=1, loss_override=torch.tensor(float("nan")))  # skipped
    skip.restore()  # no-op
    backward(model, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no decision for this one: it is applied, and nothing restores it
    after = [p.detach().clone() for p in model.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(before, after))
    skip.restore()
    assert all(torch.equal(a, b) for a, b in zip(after, model.parameters()))
    skip.remove()
    backward(model, 3)
    opt.step()  # removed: no hook left behind
    assert not opt._optimizer_step_post_hooks


def test_ranks_agree_on_the_flag_and_stay_identical_under_zero1_and_fsdp2(tmp_path):
    """Only rank 1's loss spikes; both ranks skip, and the ZeRO-1 and FSDP2 models are untouched."""
    out = tmp_path / "out.json"
    torchrun(ROOT / "tests/dist/skip_ranks.py", "--out", out)
    got = json.loads(out.read_text())
    for setup in ("plain", "zero1", "fsdp2"):
        r = got[setup]
        assert r["flags"] == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], setup  # per rank, per step
        assert r["skipped_step_unchanged"] == [True, True], setup
        if setup != "fsdp2":  # FSDP2 holds each parameter once, sharded: nothing to compare
            assert r["ranks_identical"], setup


def test_a_grad_scaler_that_takes_over_found_inf_is_reported_and_does_not_disable_later_skips():
    """torch's GradScaler sets its own found_inf on a fused optimizer and deletes it after the
    step: thermo says so, and sets its flag again at the next decision."""
    model, _ = model_and_twin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    skip = _DeviceSkip(GuardConfig(skip_z=None), opt, list(model.parameters()), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu")
    loss = model(torch.randn(4, 8)).square().mean()
    scaler.scale(loss).backward()
    skip(loss, torch.tensor(1.0))
    with pytest.warns(UserWarning, match="GradScaler"):
        scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    guarded_step(skip, model, opt, seed=2, loss_override=torch.tensor(float("nan")))  # no scaler
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
