"""Lightning adapter on a real ``lightning.Trainer`` (CPU): a tiny GPT trains with thermo attached;
poisoned samples make it stop with a blacklist and a good checkpoint; the relaunch resumes from
that checkpoint and never reads the blacklisted samples; the model is left without hooks."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

import thermo
from thermo.checkpoints import CheckpointConfig
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.data import Blacklist
from thermo.gpt import GPT, GPTConfig
from thermo.guard import DivergenceError, GuardConfig
from thermo.integrations import BlacklistDataset
from thermo.thermometer import ThermometerConfig

L = pytest.importorskip("lightning")
from thermo.integrations.lightning import ThermoCallback, resume_path  # noqa: E402

BATCH = 8
POISON_STEPS = range(56, 61)  # the last poisoned batch is read at a flush step (60)


def dataset():
    return TokenDataset(stdlib_bytes(120_000), 32)


class TinyGPT(L.LightningModule):
    def __init__(self, poisoned=()):
        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32))
        self.register_buffer("poisoned", torch.tensor(sorted(poisoned), dtype=torch.long), persistent=False)

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        _, loss = self.gpt(x, y)
        # Poisoned samples scale the loss 1e4x (on the device: no host sync in the step).
        return loss * torch.where(torch.isin(ids, self.poisoned).any(), 1e4, 1.0)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def trainer(run_dir, max_steps, cb):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=run_dir, callbacks=[cb])


def callback(run_dir, **kw):
    return ThermoCallback(run_dir, config=GuardConfig(checkpoint_every=20, **kw),
                          thermometer=ThermometerConfig(flush_every=10, attn_every=5),
                          checkpoints=CheckpointConfig(good_after=20))


def loader(run_dir):
    return torch.utils.data.DataLoader(BlacklistDataset(dataset(), run_dir), batch_size=BATCH, shuffle=False)


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_stop_with_blacklist_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    poisoned = {i for s in POISON_STEPS for i in range((s - 1) * BATCH, s * BATCH)}  # shuffle=False
    model = TinyGPT(poisoned)
    before = hooks(model)

    # First launch: trains, detects the poison, stops.
    cb = callback(run_dir)
    t = trainer(run_dir, 120, cb)
    t.fit(model, loader(run_dir), ckpt_path=resume_path(run_dir))
    # Detected at the flush after the first poisoned step; stopped there, on that step.
    assert cb.stopped and cb.verdict.detection_step == 56 and t.global_step == 60
    assert hooks(model) == before, "the thermometer's hooks must be gone after fit"
    run = thermo.load(run_dir)
    assert {"loss", "grad_norm"} <= set(run.scalars.columns) and run.scalars["step"].tolist() == list(range(1, 61))
    assert {"gpt.h.0", "gpt.h.1.attn", "gpt.h.0.mlp.c_fc"} <= set(run.layers["layer"])
    assert {"act_max", "act_min", "grad_max", "attn_max", "attn_bound"} <= set(run.layers["stat"])
    ev = run.events
    assert list(ev["kind"]) == ["verdict", "rollback"]
    rb = ev.iloc[1]["data"]
    assert rb["action"] == "stop" and rb["to_step"] < cb.verdict.onset_step <= 56
    assert poisoned <= Blacklist.load(run_dir).ids
    manifest = {e["step"]: e["health"] for e in json.loads((run_dir / "manifest.json").read_text())["checkpoints"]}
    assert manifest[rb["to_step"]] == "good" and all(h == "bad" for s, h in manifest.items() if s > rb["to_step"])
    assert resume_path(run_dir).endswith(f"step_{rb['to_step']:08d}/lightning.ckpt")

    # Relaunch (as a supervisor or a relaunch loop would): resumes at the good checkpoint, the
    # dataset leaves the blacklisted samples out, and the run finishes without another verdict.
    model2 = TinyGPT(poisoned)
    cb2 = callback(run_dir)
    t2 = trainer(run_dir, 120, cb2)
    t2.fit(model2, loader(run_dir), ckpt_path=resume_path(run_dir))
    assert not cb2.stopped and t2.global_step == 120
    run = thermo.load(run_dir)
    assert list(run.events["kind"]) == ["verdict", "rollback", "restart"]
    assert run.events.iloc[2]["data"]["checkpoint"] == rb["to_step"]
    assert run.scalars["step"].tolist() == list(range(1, 121))  # the effective timeline
    with thermo.Store(run_dir, readonly=True) as s:
        relaunched = s.ledger(rb["to_step"] + 1)
    assert sorted(relaunched) == list(range(rb["to_step"] + 1, 121))
    assert not poisoned & {i for ids in relaunched.values() for i in ids}
    assert run.scalars["loss"].iloc[-10:].max() < 10


def test_values_reach_the_trainers_own_loggers(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    run_dir = tmp_path / "pl"
    cb = callback(run_dir)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=30, logger=CSVLogger(tmp_path / "logs"),
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, default_root_dir=run_dir, callbacks=[cb])
    t.fit(TinyGPT(), loader(run_dir))
    t.logger.finalize("success")
    with open(Path(t.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("thermo/loss")]
    assert [int(r["step"]) for r in rows] == [10, 20, 30]  # one row per flush, at its step
    stored = thermo.load(run_dir).scalars.set_index("step")["loss"]
    assert float(rows[-1]["thermo/loss"]) == pytest.approx(stored[30], rel=1e-6)


def test_gives_up_after_max_rollbacks(tmp_path):
    run_dir = tmp_path / "run"
    poisoned = {i for s in POISON_STEPS for i in range((s - 1) * BATCH, s * BATCH)}
    with pytest.raises(DivergenceError, match="max_rollbacks=0"):
        trainer(run_dir, 80, callback(run_dir, max_rollbacks=0)).fit(TinyGPT(poisoned), loader(run_dir))
    assert list(thermo.load(run_dir).events["kind"]) == ["verdict", "give_up"]


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "thermo.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install thermo\[lightning\]"):
        importlib.import_module("thermo.integrations.lightning")
