"""Checkpoints: DCP save/restore, the manifest's health and retention, broken run dirs
(thermo/checkpoints/)."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from thermo._io import RunDirError
from thermo.checkpoints import (
    CheckpointConfig,
    Checkpoints,
    rebuild_manifest,
)
from thermo.checkpoints.manifest import recorded_backend
from thermo.gpt import GPT, GPTConfig
from thermo.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
CFG = GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, dropout=0.1)


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1.0 + 0.5 * i))
    return model, opt, sched


def train(model, opt, sched, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 256, (4, CFG.block_size), generator=g)
        loss = model(x, x.roll(-1, 1))[1]  # dropout draws from the global RNG
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    return losses


def snapshot(model, opt, sched) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optim": copy.deepcopy(get_state_dict(model, opt)[1]),  # deep: these are the live tensors
        "sched": sched.state_dict(),
        "lr": [g["lr"] for g in opt.param_groups],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    assert sa.keys() == sb.keys()
    for fqn in sa:
        for k in sa[fqn]:
            assert torch.equal(sa[fqn][k], sb[fqn][k]), (fqn, k)
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]
    assert {k: v for k, v in a["sched"].items() if k != "lr_lambdas"} == {
        k: v for k, v in b["sched"].items() if k != "lr_lambdas"
    }
    assert a["lr"] == b["lr"]


def draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), np.random.rand(2).tolist()


def tiny(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = nn.Linear(3, 2)
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def save_steps(ckpts: Checkpoints, steps) -> None:
    m, o = tiny()
    for s in steps:
        ckpts.save(s, m, o, data={"cursor": s})


def folders(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# -- save and restore, one process ------------------------------------------------------------


@pytest.mark.parametrize("fresh", [False, True], ids=["rollback-same-objects", "restart-fresh-objects"])
def test_save_modify_restore_is_bit_exact(tmp_path, fresh):
    model, opt, sched = make()
    train(model, opt, sched, 3)
    ckpts = Checkpoints(tmp_path, good_after=2)
    data = {"epoch": 0, "cursor": 12}
    extra = {"thermometer": {"step": 3, "attempt": 0}, "detector": {"window": [1.5, float("nan")]}}
    entry = ckpts.save(3, model, opt, sched, data=data, extra=extra)
    assert entry.health == "pending" and entry.world_size == 1 and entry.data == data
    before = snapshot(model, opt, sched)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    expected_draws = draws()
    for state, setter in zip(rng, (torch.set_rng_state, random.setstate, np.random.set_state)):
        setter(state)
    losses = train(model, opt, sched, 3, start=3)  # the uninterrupted continuation
    ckpts.promote(5)

    if fresh:
        model, opt, sched = make(seed=1)
    else:
        train(model, opt, sched, 2, start=100)  # wander off
    out = ckpts.restore(ckpts.newest_good(), model, opt, sched)
    assert out["step"] == 3 and out["data"] == data
    assert out["extra"]["thermometer"] == extra["thermometer"]
    assert np.isnan(out["extra"]["detector"]["window"][1])
    assert_same(snapshot(model, opt, sched), before)
    rng_after = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    assert draws() == expected_draws
    for state, setter in zip(rng_after, (torch.set_rng_state, random.setstate, np.random.set_state)):
        setter(state)
    assert train(model, opt, sched, 3, start=3) == losses  # training continues identically


def test_model_only_checkpoint_and_missing_scheduler_is_clear(tmp_path):
    model, opt, sched = make()
    ckpts = Checkpoints(tmp_path, good_after=0, rng=False)
    e = ckpts.save(1, model)
    m2, o2, s2 = make(seed=1)
    ckpts.restore(e, m2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))
    with pytest.raises(ValueError, match="holds no scheduler state"):
        ckpts.restore(e, m2, o2, s2)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        ckpts.restore(e, m2, o2)


def test_non_json_data_is_a_clear_error_and_writes_nothing(tmp_path):
    m, o = tiny()
    ckpts = Checkpoints(tmp_path)
    with pytest.raises(ValueError, match="data must be JSON-serialisable"):
        ckpts.save(1, m, o, data={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="extra must be JSON-serialisable"):
        ckpts.save(1, m, o, extra={"f": object()})
    assert ckpts.entries == [] and not (tmp_path / "checkpoints").exists()


# -- manifest: health and retention ------------------------------------------------------------


def test_health_transitions(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=10, good_after=15)
    save_steps(ckpts, [10, 20, 30, 40])
    assert [e.health for e in ckpts.entries] == ["pending"] * 4
    assert ckpts.newest_good() is None
    assert ckpts.promote(34) == [10]  # 20 + 15 > 34
    assert ckpts.promote(45) == [20, 30]
    assert ckpts.newest_good().step == 30
    assert ckpts.newest_good(before_step=30).step == 20
    assert ckpts.newest_good(before_step=10) is None
    assert ckpts.mark_bad(25) == [30, 40]  # 30 was good: the onset says it was already sick
    assert ckpts.promote(1000) == []  # bad stays bad
    assert ckpts.newest_good().step == 20
    again = Checkpoints(tmp_path)  # the manifest is the truth across restarts
    assert [(e.step, e.health) for e in again.entries] == [
        (10, "good"), (20, "good"), (30, "bad"), (40, "bad"),
    ]
    assert "onset step 25" in again.entries[2].note
    obj = json.loads(RunDir(tmp_path).manifest.read_text())
    assert obj["format"] == "thermo.manifest" and obj["version"] == 1
    assert obj["checkpoints"][0]["data"] == {"cursor": 10}


def test_retention_keeps_last_k_plus_newest_good_and_drops_bad_and_strays(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=2, good_after=5)
    save_steps(ckpts, [10, 20])
    ckpts.promote(16)  # 10 good
    save_steps(ckpts, [30, 40])
    # 10: the newest good; 20: the next to become good; 30, 40: the last 2.
    assert [e.step for e in ckpts.entries] == [10, 20, 30, 40]
    ckpts.promote(26)  # 20 good
    save_steps(ckpts, [50])
    assert [e.step for e in ckpts.entries] == [20, 30, 40, 50]
    assert folders(tmp_path) == ["step_00000020", "step_00000030", "step_00000040", "step_00000050"]
    ckpts.mark_bad(45)
    (tmp_path / "checkpoints" / "step_00000055").mkdir()  # a save killed before its commit
    (tmp_path / "checkpoints" / "notes").mkdir()  # not ours: never touched
    save_steps(ckpts, [60])
    assert [(e.step, e.health) for e in ckpts.entries] == [(20, "good"), (30, "pending"), (40, "pending"),
                                                          (60, "pending")]
    assert folders(tmp_path) == ["notes", "step_00000020", "step_00000030", "step_00000040", "step_00000060"]


def test_retention_keeps_a_good_checkpoint_from_before_the_horizon(tmp_path):
    """A verdict's onset can lie far back (the growth rule walks back up to 200 steps): keep a good
    checkpoint old enough for it, or the oldest good one when none is that old."""
    ckpts = Checkpoints(tmp_path, keep_last=2, good_after=0, horizon=45)
    for step in (0, 20, 40):
        save_steps(ckpts, [step])
        ckpts.promote(step)  # as the Guard does at each healthy flush
    assert [e.step for e in ckpts.entries] == [0, 20, 40]  # nothing is 45 steps older than 40: keep 0
    for step in (60, 80, 100):
        save_steps(ckpts, [step])
        ckpts.promote(step)
    save_steps(ckpts, [120])
    # 100, 120: the last 2; 80, 100: good within 45 steps of 120; 60: the newest good before that.
    assert [e.step for e in ckpts.entries] == [60, 80, 100, 120]
    assert ckpts.newest_good(before_step=75 - 10).step == 60  # an onset at 75, margin 10


def test_restore_supersedes_later_checkpoints(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=5, good_after=0)
    save_steps(ckpts, [10, 20, 30])
    ckpts.promote(30)
    m, o = tiny(seed=3)
    ckpts.restore(ckpts.newest_good(before_step=15), m, o)
    assert [e.health for e in ckpts.entries] == ["good", "bad", "bad"]
    assert "rolled back to step 10" in ckpts.entries[1].note
    save_steps(ckpts, [20])  # the new timeline's step 20 replaces the abandoned one
    assert [(e.step, e.health) for e in ckpts.entries] == [(10, "good"), (20, "pending")]  # 30 deleted


# -- broken run directories --------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["rmtree", "metadata", "shard", "state"])
def test_torn_or_deleted_folder_falls_back_to_older_good_with_warning(tmp_path, damage):
    ckpts = Checkpoints(tmp_path, keep_last=5, good_after=0)
    save_steps(ckpts, [10, 20])
    ckpts.promote(20)
    newest = tmp_path / "checkpoints" / "step_00000020"
    if damage == "rmtree":
        shutil.rmtree(newest)
    elif damage == "metadata":
        (newest / ".metadata").unlink()
    elif damage == "shard":
        shard = next(newest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:10])
    else:
        (newest / "thermo.json").unlink()
    with pytest.warns(RuntimeWarning, match="step_00000020 is unusable"):
        entry = ckpts.newest_good()
    assert entry.step == 10
    m, o = tiny(seed=5)
    ckpts.restore(entry, m, o)
    assert torch.equal(m.weight, tiny()[0].weight)


def test_manifest_names_the_backend_that_wrote_the_folders(tmp_path):
    class Pickled:  # a framework's own format: one torch.save'd file per folder
        name = "pickled"

        def save(self, path, model, optimizer, scheduler, rng):
            path.mkdir()
            torch.save(model.state_dict(), path / "model.pt")

        def load(self, path, model, optimizer, scheduler, rng):
            model.load_state_dict(torch.load(path / "model.pt"))

        def torn(self, path):
            return None if (path / "model.pt").is_file() else "model.pt is missing"

    ckpts = Checkpoints(tmp_path / "a", backend=Pickled(), good_after=0)
    save_steps(ckpts, [10])
    assert recorded_backend(tmp_path / "a") == "pickled"
    manifest = (tmp_path / "a" / "manifest.json").read_bytes()
    # Another kind of loop pointed at this run directory: one clear error, nothing touched.
    with pytest.raises(RunDirError, match="written by the 'pickled' backend, and this process saves "
                                          "and loads 'dcp' ones: give this run its own run directory"):
        Checkpoints(tmp_path / "a")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == manifest
    save_steps(Checkpoints(tmp_path / "b", good_after=0), [10])
    assert recorded_backend(tmp_path / "b") == "dcp"
    # A manifest from before the field: nobody's to check against (it was DCP's).
    m = tmp_path / "b" / "manifest.json"
    m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items() if k != "backend"}))
    assert recorded_backend(tmp_path / "b") is None
    assert [e.step for e in Checkpoints(tmp_path / "b").entries] == [10]


def test_stray_folder_is_never_loaded(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=5, good_after=0)
    save_steps(ckpts, [10])
    # A complete-looking save whose manifest commit never happened (SIGKILL after dcp.save).
    shutil.copytree(tmp_path / "checkpoints" / "step_00000010", tmp_path / "checkpoints" / "step_00000020")
    ckpts = Checkpoints(tmp_path, good_after=0)
    ckpts.promote(100)
    assert [e.step for e in ckpts.entries] == [10] and ckpts.newest_good().step == 10


def test_missing_manifest_with_folders_is_a_clear_error_and_rebuild(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=5)
    save_steps(ckpts, [10, 20])
    RunDir(tmp_path).manifest.unlink()
    with pytest.raises(RunDirError, match="is missing but .* holds 2 checkpoint folders") as err:
        Checkpoints(tmp_path)
    assert "rebuild_manifest" in str(err.value) and "\n" not in str(err.value)
    assert folders(tmp_path) == ["step_00000010", "step_00000020"]  # nothing deleted
    (tmp_path / "checkpoints" / "step_00000020" / ".metadata").unlink()  # torn: left out
    entries = rebuild_manifest(tmp_path)
    assert [(e.step, e.health, e.data) for e in entries] == [(10, "pending", {"cursor": 10})]
    assert [e.step for e in Checkpoints(tmp_path).entries] == [10]
    with pytest.raises(RunDirError, match="exists"):
        rebuild_manifest(tmp_path)


def test_fresh_run_dir_gets_an_empty_manifest(tmp_path):
    assert Checkpoints(tmp_path / "new").entries == []
    assert json.loads(RunDir(tmp_path / "new").manifest.read_text())["checkpoints"] == []


@pytest.mark.parametrize(
    "content, match",
    [
        ("{broken", "not valid JSON"),
        ('{"format": "something.else"}', "is not a thermo checkpoint manifest"),
        ('{"format": "thermo.manifest", "version": 7, "checkpoints": []}', "Upgrade thermo"),
        ('{"format": "thermo.manifest", "version": 1, "checkpoints": [{"step": 1}]}', "entry 0 is malformed"),
        (
            '{"format": "thermo.manifest", "version": 1, "checkpoints": [{"step": 1, "path": '
            '"../../elsewhere/step_00000001", "health": "good", "time": 0, "world_size": 1}]}',
            "entry 0 is malformed",
        ),
        (
            '{"format": "thermo.manifest", "version": 1, "checkpoints": [{"step": 1, "path": '
            '"checkpoints/step_00000001", "health": "great", "time": 0, "world_size": 1}]}',
            "entry 0 is malformed",
        ),
    ],
)
def test_corrupt_manifest_is_one_clear_error_and_nothing_deleted(tmp_path, content, match):
    ckpts = Checkpoints(tmp_path)
    save_steps(ckpts, [10])
    RunDir(tmp_path).manifest.write_text(content)
    with pytest.raises(RunDirError, match=match) as err:
        Checkpoints(tmp_path)
    assert str(RunDir(tmp_path).manifest) in str(err.value) and "\n" not in str(err.value)
    assert RunDir(tmp_path).manifest.read_text() == content
    assert folders(tmp_path) == ["step_00000010"]


@pytest.mark.parametrize(
    "kwargs, field",
    [({"keep_last": 0}, "keep_last"), ({"good_after": -1}, "good_after"), ({"folder": "/abs"}, "folder"),
     ({"folder": "../up"}, "folder")],
)
def test_impossible_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"CheckpointConfig.{field}"):
        CheckpointConfig(**kwargs)


# -- two ranks (torchrun, gloo) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One torchrun launch (~15 s on 2 cores) serves every 2-rank test."""
    out = tmp_path_factory.mktemp("ckpt_dist")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(REPO / "tests" / "dist" / "ckpt_roundtrip.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "zero1"])
def test_two_rank_save_restore_is_bit_exact_and_training_continues(two_rank_run, mode):
    out, result = two_rank_run
    r = result[mode]
    manifest = json.loads(RunDir(out / mode).manifest.read_text())["checkpoints"]
    assert [(e["step"], e["health"], e["world_size"]) for e in manifest] == [(3, "good", 2)]
    shards = sorted(p.name for p in (out / mode / manifest[0]["path"]).glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own part
    assert r["entry_step"] == 3 and r["world_size"] == 2 and r["entry_same_on_all_ranks"]
    assert r["differs_before"], "the restore target must start out different"
    assert r["restore_exact"] and r["rng_exact"] and r["data_exact"]
    assert r["extra"] == {"mode": mode, "inf": float("inf")}
    assert r["losses_b"] == r["losses_a"] and r["end_exact"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "zero1"])
def test_two_rank_checkpoint_restores_in_one_process(two_rank_run, mode):
    """Per-name optimizer state: a ZeRO-1 or FSDP2 checkpoint loads into a plain AdamW."""
    out, _ = two_rank_run
    full = torch.load(out / mode / "full.pt", weights_only=False)
    torch.manual_seed(7)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=32, dropout=0.1))  # as the script
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1.0 + 0.5 * i))
    ckpts = Checkpoints(out / mode, rng=False)
    ckpts.restore(ckpts.entries[0], model, opt, sched)
    for k, v in model.state_dict().items():
        assert torch.equal(v, full["model"][k]), k
    state = get_state_dict(model, opt)[1]["state"]
    assert state.keys() == full["optim"].keys()
    for fqn, st in full["optim"].items():
        for k, v in st.items():
            assert torch.equal(state[fqn][k], v), (fqn, k)


# -- mounts, integrity, trust, retention bound (issue 12) -------------------------------------


def test_checkpoints_folder_as_a_symlink_to_another_disk_works_on_every_later_launch(tmp_path):
    other = tmp_path / "scratch" / "ckpts"  # the usual HPC layout: RUN/checkpoints -> scratch
    other.mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(other)
    for launch in range(3):
        ckpts = Checkpoints(run, keep_last=2, good_after=0)  # a later launch reads the manifest
        save_steps(ckpts, [10 * launch + 10])
        ckpts.promote(10 * launch + 10)
    assert [e.step for e in Checkpoints(run).entries] == [20, 30]
    assert sorted(p.name for p in other.iterdir()) == ["step_00000020", "step_00000030"]
    m, o = tiny(seed=9)
    Checkpoints(run).restore(Checkpoints(run).newest_good(), m, o)
    assert torch.equal(m.weight, tiny()[0].weight)


@pytest.mark.parametrize("damage", ["flipped byte", "empty thermo.json", "thermo.json not ours"])
def test_a_bad_checkpoint_is_skipped_with_a_warning_for_the_next_good_one(tmp_path, damage):
    ckpts = Checkpoints(tmp_path, keep_last=5, good_after=0)
    save_steps(ckpts, [10, 20])
    ckpts.promote(20)
    newest = tmp_path / "checkpoints" / "step_00000020"
    if damage == "flipped byte":  # same size: only the checksum can tell
        shard = max(newest.glob("*.distcp"), key=lambda f: f.stat().st_size)
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "empty thermo.json":
        (newest / "thermo.json").write_text("")
    else:
        (newest / "thermo.json").write_text('{"format": "something else"}')
    fresh = Checkpoints(tmp_path)  # another process: nothing cached
    with pytest.warns(RuntimeWarning, match="step_00000020 is unusable"):
        assert fresh.newest_good().step == 10
    m, o = tiny(seed=5)
    with pytest.raises(RunDirError, match="step_00000020 is unusable"):
        fresh.restore(fresh.entries[1], m, o)  # never loaded, even when asked for by name
    assert torch.equal(m.weight, tiny(seed=5)[0].weight)


def test_the_manifest_holds_a_checksum_of_every_file(tmp_path):
    import hashlib

    ckpts = Checkpoints(tmp_path, keep_last=5, good_after=0)
    save_steps(ckpts, [10])
    (entry,) = json.loads(RunDir(tmp_path).manifest.read_text())["checkpoints"]
    folder = tmp_path / "checkpoints" / "step_00000010"
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert sorted(entry["files"]) == on_disk and ".metadata" in on_disk and "thermo.json" in on_disk
    for rel, (size, digest) in entry["files"].items():
        data = (folder / rel).read_bytes()
        assert size == len(data) and digest == hashlib.sha256(data).hexdigest()


def test_a_planted_symlink_for_a_step_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not thermo's")
    run = tmp_path / "run"
    ckpts = Checkpoints(run, keep_last=5, good_after=0)
    save_steps(ckpts, [10])
    (run / "checkpoints" / "step_00000020").symlink_to(outside)
    with pytest.warns(RuntimeWarning, match="is a symlink, which thermo never writes"):
        save_steps(ckpts, [20])
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]  # nothing written through it
    assert not (run / "checkpoints" / "step_00000020").is_symlink()
    # A link planted over a committed folder is refused when judged, and retention removes the
    # link only, never what it points to.
    shutil.rmtree(run / "checkpoints" / "step_00000020")
    (run / "checkpoints" / "step_00000020").symlink_to(outside)
    ckpts.promote(100)
    with pytest.warns(RuntimeWarning, match="step_00000020 is unusable .*symlink"):
        assert ckpts.newest_good().step == 10
    save_steps(ckpts, [30])
    assert (outside / "keep.txt").read_text() == "not thermo's"


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_judging_a_checkpoint_never_unpickles(tmp_path):
    """DCP's .metadata is a pickle: a crafted one must not run when thermo (or thermo supervise)
    only judges whether a folder is usable. Its checksum gives it away; without checksums (a
    manifest from before them) presence and sizes are all that is read."""
    import pickle

    _Boom.marker = tmp_path / "pwned"
    ckpts = Checkpoints(tmp_path / "run", keep_last=5, good_after=0)
    save_steps(ckpts, [10, 20])
    ckpts.promote(20)
    meta = tmp_path / "run" / "checkpoints" / "step_00000020" / ".metadata"
    meta.write_bytes(pickle.dumps(_Boom()))
    with pytest.warns(RuntimeWarning, match=r"\.metadata has 1\d\d bytes"):
        assert Checkpoints(tmp_path / "run").newest_good().step == 10
    manifest = RunDir(tmp_path / "run").manifest
    obj = json.loads(manifest.read_text())
    for e in obj["checkpoints"]:
        e.pop("files")
    manifest.write_text(json.dumps(obj))
    assert Checkpoints(tmp_path / "run").newest_good().step == 20  # judged by presence only
    assert not _Boom.marker.exists()


def test_retention_is_bounded_whatever_the_checkpoint_interval(tmp_path):
    """--checkpoint-every 2 --keep-last 2 with a 200-step look-back kept 107 folders; now at most
    keep_last + keep_between + 3, and a good one from before the look-back is always among them."""
    cfg = CheckpointConfig(keep_last=2, good_after=10, horizon=210, keep_between=2)
    ckpts = Checkpoints(tmp_path, cfg)
    m, o = tiny()
    for step in range(0, 401, 2):
        ckpts.save(step, m, o)
        ckpts.promote(step)
        assert len(ckpts.entries) <= 2 + 2 + 3
        assert len(folders(tmp_path)) == len(ckpts.entries)
    steps = [e.step for e in ckpts.entries]
    assert steps[-2:] == [398, 400]
    # Every onset the detector can still report (up to 200 steps back, margin 10) has a target.
    for onset in range(400 - 200, 401):
        assert ckpts.newest_good(before_step=onset - 10) is not None


def test_retention_stays_within_a_disk_budget_and_keeps_what_a_rollback_needs(tmp_path):
    m, o = tiny()
    probe = Checkpoints(tmp_path / "probe", good_after=0)
    one = sum(size for size, _ in probe.save(1, m, o).files.values())
    cfg = CheckpointConfig(keep_last=4, good_after=10, horizon=100, keep_between=3, max_bytes=int(4.5 * one))
    ckpts = Checkpoints(tmp_path / "run", cfg)
    for step in range(0, 301, 5):
        ckpts.save(step, m, o)
        ckpts.promote(step)
        on_disk = sum(p.stat().st_size for p in (tmp_path / "run" / "checkpoints").rglob("*") if p.is_file())
        assert on_disk <= cfg.max_bytes * 1.05, (step, on_disk / one)  # (+ a byte or two of thermo.json)
    steps = [e.step for e in ckpts.entries]
    good = [e.step for e in ckpts.entries if e.health == "good"]
    assert steps[-1] == 300 and len(steps) == 4
    assert any(s < 300 - 100 for s in good)  # the one every possible onset can return to
    with pytest.warns(RuntimeWarning, match="over CheckpointConfig.max_bytes"):
        tight = Checkpoints(tmp_path / "tight", replace_cfg(cfg, max_bytes=one))
        for step in range(0, 200, 5):
            tight.save(step, m, o)
            tight.promote(step)
    # The newest, the newest good, the next to become good, the good one before the look-back.
    assert len(tight.entries) <= 4 and any(e.health == "good" for e in tight.entries)


def replace_cfg(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
