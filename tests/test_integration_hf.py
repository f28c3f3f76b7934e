"""Hugging Face adapter: a tiny GPT-2 trains with `ThermoCallback` attached; poisoned samples make
it stop with a blacklist and the newest good ``checkpoint-N`` left as the Trainer's last one; the
relaunch resumes there and never reads the blacklisted samples; the model is left without hooks.

The real ``transformers.Trainer`` needs ``accelerate``. Where it is missing,
`test_real_trainer_stop_and_resume` is skipped and the same scenario runs through `MiniTrainer`:
the Trainer's own callback machinery (``CallbackHandler``, ``DefaultFlowCallback``,
``TrainerState``, ``TrainerControl``, ``get_last_checkpoint``) driven in the order of
``Trainer._run_epoch`` (transformers 5.x), with Trainer-layout checkpoints.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import thermo
from thermo.checkpoints import CheckpointConfig
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.data import Blacklist
from thermo.guard import DivergenceError, GuardConfig
from thermo.integrations import BlacklistDataset
from thermo.thermometer import ThermometerConfig

transformers = pytest.importorskip("transformers")
from transformers.trainer_callback import (  # noqa: E402
    CallbackHandler,
    DefaultFlowCallback,
    TrainerControl,
    TrainerState,
)
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from thermo.integrations.hf import ThermoCallback  # noqa: E402

BATCH = 8
POISON_STEPS = range(56, 61)  # read in order (sequential sampling); 60 is a flush step
POISONED = {i for s in POISON_STEPS for i in range((s - 1) * BATCH, s * BATCH)}


class LMData(torch.utils.data.Dataset):
    """Byte-level language-model samples as the Trainer expects them: dicts of tensors."""

    def __init__(self):
        self.tokens = TokenDataset(stdlib_bytes(120_000), 32)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        x, _ = self.tokens[i]
        return {"input_ids": x, "labels": x}


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=256, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def poisoned_loss(model, inputs):
    """The model's loss, scaled 1e4x (a gradient spike) when the batch holds a poisoned sample.
    The scale stays on the device; the callback records the model's own, unscaled loss."""
    poisoned = torch.tensor(sorted(POISONED))
    scale = torch.where(torch.isin(inputs["sample_id"], poisoned).any(), 1e4, 1.0)
    return model(**inputs).loss * scale


def callback(**kw):
    return ThermoCallback(config=GuardConfig(**kw), thermometer=ThermometerConfig(flush_every=10, attn_every=5),
                          checkpoints=CheckpointConfig(good_after=20))


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


class MiniTrainer:
    """`Trainer._run_epoch`'s event order with the Trainer's own callback classes (see the module
    docstring): sequential sampling, batch size 8, AdamW, no accumulation, no clipping by the
    Trainer, checkpoints ``checkpoint-N`` with model, optimizer and ``trainer_state.json``."""

    def __init__(self, out, dataset, cb, max_steps=120, save_steps=20):
        self.args = SimpleNamespace(
            output_dir=str(out), max_grad_norm=0.0, deepspeed=None, logging_first_step=False,
            remove_unused_columns=False,
            logging_strategy="no", logging_steps=500, eval_strategy="no", eval_steps=None, eval_delay=0,
            save_strategy="steps", save_steps=save_steps)
        self.model = tiny_gpt2()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.dataset = dataset
        self.handler = CallbackHandler([DefaultFlowCallback, cb], self.model, None, self.optimizer, None)
        self.max_steps = max_steps

    def train(self, resume_from_checkpoint=None):
        args, model = self.args, self.model
        state = TrainerState()
        state.compute_steps(args, self.max_steps)
        state.max_steps = self.max_steps
        if resume_from_checkpoint is not None:
            state = TrainerState.load_from_json(f"{resume_from_checkpoint}/trainer_state.json")
            saved = torch.load(f"{resume_from_checkpoint}/state.pt")
            model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=BATCH, shuffle=False)
        batches = iter(loader)
        for _ in range(state.global_step):  # the Trainer's fast-forward (skip_first_batches)
            next(batches)
        control = TrainerControl()
        model.train()
        control = self.handler.on_train_begin(args, state, control)
        control = self.handler.on_epoch_begin(args, state, control)
        for inputs in batches:
            control = self.handler.on_step_begin(args, state, control)
            poisoned_loss(model, inputs).backward()
            control = self.handler.on_pre_optimizer_step(args, state, control)
            self.optimizer.step()
            control = self.handler.on_optimizer_step(args, state, control)
            model.zero_grad()
            state.global_step += 1
            control = self.handler.on_step_end(args, state, control)
            if control.should_save:
                folder = f"{args.output_dir}/checkpoint-{state.global_step}"
                os.makedirs(folder)
                torch.save({"model": model.state_dict(), "optimizer": self.optimizer.state_dict()}, f"{folder}/state.pt")
                state.save_to_json(f"{folder}/trainer_state.json")
                control = self.handler.on_save(args, state, control)
            if control.should_training_stop:
                break
        control = self.handler.on_epoch_end(args, state, control)
        self.handler.on_train_end(args, state, control)
        return state


def check_first_launch(out, cb, state, model) -> dict:
    """Shared by the MiniTrainer and the real-Trainer tests: the first launch stopped as it should.
    Returns the rollback event's data."""
    run_dir = out / "thermo"
    assert cb.stopped and cb.verdict.onset_step <= 56 == cb.verdict.detection_step and state.global_step == 60
    run = thermo.load(run_dir)
    assert {"loss", "grad_norm"} <= set(run.scalars.columns) and run.scalars["step"].tolist() == list(range(1, 61))
    assert {"transformer.h.0", "transformer.h.1.attn", "transformer.h.0.mlp.c_fc"} <= set(run.layers["layer"])
    assert {"act_max", "act_min", "grad_max", "attn_max"} <= set(run.layers["stat"])
    assert run.scalars["loss"].max() < 10, "the recorded loss is the model's own, not the scaled one"
    ev = run.events
    assert list(ev["kind"]) == ["verdict", "rollback"]
    rb = ev.iloc[1]["data"]
    assert rb["action"] == "stop" and rb["to_step"] < cb.verdict.onset_step
    assert POISONED <= Blacklist.load(run_dir).ids
    # The Trainer's own resume logic now finds the good checkpoint; the later ones are hidden.
    assert get_last_checkpoint(str(out)).endswith(f"checkpoint-{rb['to_step']}")
    later = [n for n in (20, 40) if n > rb["to_step"]]  # saved before the stop; 60 never was
    assert later and all((out / f"thermo-bad-checkpoint-{n}").is_dir() for n in later)
    assert not (out / "checkpoint-60").exists() and not (out / "thermo-bad-checkpoint-60").exists()
    assert hooks(model) == hooks(tiny_gpt2()), "the callback's hooks must be gone"
    return rb


def check_relaunch(out, rb, cb2, state2) -> None:
    """The relaunch resumed at the good checkpoint and never read a blacklisted sample."""
    run_dir = out / "thermo"
    assert not cb2.stopped and state2.global_step == 120
    run = thermo.load(run_dir)
    assert list(run.events["kind"]) == ["verdict", "rollback", "restart"]
    assert run.events.iloc[2]["data"]["checkpoint"] == rb["to_step"]
    assert run.scalars["step"].tolist() == list(range(1, 121))
    with thermo.Store(run_dir, readonly=True) as s:
        relaunched = s.ledger(rb["to_step"] + 1)
    assert sorted(relaunched) == list(range(rb["to_step"] + 1, 121))
    assert not POISONED & {i for ids in relaunched.values() for i in ids}
    manifest = json.loads((run_dir / "manifest.json").read_text())["checkpoints"]
    assert all(e["health"] != "bad" for e in manifest if e["step"] > 60)  # the new timeline's


def test_stop_with_blacklist_then_resume(tmp_path):
    out = tmp_path / "out"
    cb = callback()
    mini = MiniTrainer(out, BlacklistDataset(LMData(), out / "thermo"), cb)
    before = hooks(mini.model)
    state = mini.train(resume_from_checkpoint=get_last_checkpoint(str(out)) if out.exists() else None)
    assert hooks(mini.model) == before
    rb = check_first_launch(out, cb, state, mini.model)

    cb2 = callback()  # the relaunch: a fresh process would build all of this again
    mini2 = MiniTrainer(out, BlacklistDataset(LMData(), out / "thermo"), cb2)
    state2 = mini2.train(resume_from_checkpoint=get_last_checkpoint(str(out)))
    check_relaunch(out, rb, cb2, state2)


def test_gives_up_after_max_rollbacks(tmp_path):
    out = tmp_path / "out"
    mini = MiniTrainer(out, BlacklistDataset(LMData(), out / "thermo"), callback(max_rollbacks=0), max_steps=80)
    with pytest.raises(DivergenceError, match="max_rollbacks=0"):
        mini.train()
    assert list(thermo.load(out / "thermo").events["kind"]) == ["verdict", "give_up"]


def test_trainer_clipping_is_refused_with_the_fix(tmp_path):
    out = tmp_path / "out"
    mini = MiniTrainer(out, BlacklistDataset(LMData(), None), callback())
    mini.args.max_grad_norm = 1.0
    with pytest.raises(ValueError, match=r"max_grad_norm=0 and pass ThermoCallback\(clip_grad_norm=1.0\)"):
        mini.train()


def test_column_removal_is_refused_with_the_fix(tmp_path):
    mini = MiniTrainer(tmp_path / "out", BlacklistDataset(LMData(), None), callback())
    mini.args.remove_unused_columns = True
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        mini.train()


def test_clip_grad_norm_records_the_norm_before_clipping(tmp_path):
    out = tmp_path / "out"
    cb = ThermoCallback(clip_grad_norm=1e-3, thermometer=ThermometerConfig(flush_every=5))
    mini = MiniTrainer(out, BlacklistDataset(LMData(), None), cb, max_steps=5, save_steps=100)
    mini.train()
    gn = thermo.load(out / "thermo").scalars["grad_norm"]
    assert len(gn) == 5 and (gn > 1e-2).all()  # recorded before the clip to 1e-3


def test_blacklist_dataset_leaves_ids_out_and_tags_items(tmp_path):
    Blacklist(tmp_path).add([1, 3], reason="test")
    ds = BlacklistDataset([{"a": 10}, {"a": 11}, {"a": 12}, {"a": 13}], tmp_path)
    assert len(ds) == 2 and ds[0] == {"a": 10, "sample_id": 0} and ds[1] == {"a": 12, "sample_id": 2}
    assert BlacklistDataset([(0, 1), (2, 3)], None)[1] == (2, 3, 1)
    assert BlacklistDataset(["x", "y"], None)[1] == ("y", 1)
    Blacklist(tmp_path).add([0, 2], reason="test")
    with pytest.raises(ValueError, match="all 4 samples are blacklisted"):
        BlacklistDataset([0, 1, 2, 3], tmp_path)


def test_real_trainer_stop_and_resume(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install thermo[hf])")
    from transformers import Trainer, TrainingArguments

    class PoisonTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return poisoned_loss(model, inputs)

    out = tmp_path / "out"

    def launch():
        cb = callback()
        args = TrainingArguments(
            output_dir=str(out), max_steps=120, per_device_train_batch_size=BATCH, learning_rate=3e-3,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, save_steps=20,
            save_strategy="steps", logging_steps=1000, report_to=[], use_cpu=True, dataloader_num_workers=0,
            train_sampling_strategy="sequential", disable_tqdm=True, seed=0, remove_unused_columns=False)
        trainer = PoisonTrainer(model=tiny_gpt2(), args=args, train_dataset=BlacklistDataset(LMData(), out / "thermo"),
                                callbacks=[cb])
        trainer.train(resume_from_checkpoint=get_last_checkpoint(str(out)) if out.exists() else None)
        return cb, trainer.state, trainer.model

    cb, state, model = launch()
    # thermo's values reach the Trainer's own log at each flush (logging_steps is 1000 here).
    rows = [r for r in state.log_history if "thermo/grad_norm" in r]
    assert rows and all(r["step"] % 10 == 0 for r in rows) and all(len(r) <= 102 for r in rows)
    rb = check_first_launch(out, cb, state, model)
    cb2, state2, _ = launch()
    check_relaunch(out, rb, cb2, state2)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "thermo.integrations.hf", raising=False)
    with pytest.raises(ImportError, match=r"pip install thermo\[hf\]"):
        importlib.import_module("thermo.integrations.hf")


def test_a_signal_saves_a_checkpoint_stops_the_trainer_and_the_relaunch_resumes_there(tmp_path):
    """SIGUSR1 during step 33 (one process: that step is the boundary): the Trainer saves
    checkpoint-33 and stops, train() raises Preempted (exit 87); thermo's manifest holds the
    checkpoint pending until healthy steps follow it in the relaunch, which resumes there."""
    import signal

    from transformers import TrainerCallback

    from thermo.guard import EXIT_PREEMPTED, Preempted

    class Scheduler(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 32:  # step 33 is in progress
                os.kill(os.getpid(), signal.SIGUSR1)

    def cb():
        return ThermoCallback(thermometer=ThermometerConfig(flush_every=10, attn_every=5),
                              checkpoints=CheckpointConfig(good_after=10))

    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGUSR1)
    first = MiniTrainer(out, BlacklistDataset(LMData(), out / "thermo"), cb(), max_steps=50)
    first.handler.add_callback(Scheduler)
    with pytest.raises(Preempted) as e:
        first.train()
    assert e.value.code == EXIT_PREEMPTED and e.value.step == 33
    assert signal.getsignal(signal.SIGUSR1) is before and hooks(first.model) == 0
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-33")

    def manifest():
        entries = json.loads((out / "thermo" / "manifest.json").read_text())["checkpoints"]
        return {e["step"]: e["health"] for e in entries}

    assert manifest()[33] == "pending"
    ev = thermo.load(out / "thermo").events
    (pre,) = ev[ev["kind"] == "preempt"]["data"]
    assert (pre["checkpoint"], pre["signal"]) == (33, "SIGUSR1")

    state = MiniTrainer(out, BlacklistDataset(LMData(), out / "thermo"), cb(), max_steps=50).train(
        resume_from_checkpoint=get_last_checkpoint(str(out)))
    assert state.global_step == 50
    assert manifest()[33] == "good"  # healthy through the flush at step 50 (good_after=10)
    assert thermo.load(out / "thermo").scalars["step"].tolist() == list(range(1, 51))
