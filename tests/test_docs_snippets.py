"""The "Use with your loop" snippets of the README run as written, on a small GPT,
and examples/dropin.py runs and writes a store. (The FSDP2, ZeRO-1 and DeepSpeed snippets need 2
ranks: tests/test_integration_deepspeed.py runs them in its torchrun launch.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import thermo
from tests.distributed import ROOT
from tests.dist.ds_guard import snippet, snippets
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.gpt import GPT, GPTConfig

DOC = ROOT / "README.md"


def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32))


def namespace(**extra):
    model = gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dataset = TokenDataset(stdlib_bytes(100_000), 32)
    ns = {"torch": torch, "model": model, "optimizer": optimizer, "dataset": dataset, "max_steps": 12,
          "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
          "loader": [dataset.batch(range(i * 8, i * 8 + 8)) for i in range(12)]}
    ns.update(extra)
    return ns


def run(prefix: str, ns: dict) -> dict:
    exec(compile(snippet(DOC, prefix), f"{DOC.name}:{prefix}", "exec"), ns)
    return ns


def test_every_section_has_one_snippet():
    assert list(snippets(DOC)) == [
        "Plain PyTorch: thermometers only", "Plain PyTorch: rollback and skip", "FSDP2",
        "ZeRO-1 (DDP + ZeroRedundancyOptimizer)", "Hugging Face Trainer", "Lightning", "DeepSpeed"]


def test_plain_pytorch_thermometer_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run("Plain PyTorch: thermometers only", namespace())
    run_ = thermo.load(tmp_path / "runs/exp1")
    assert list(run_.scalars["step"]) == list(range(12)) and {"loss", "grad_norm"} <= set(run_.scalars.columns)
    assert not any(m._forward_hooks for m in ns["model"].modules())


def test_plain_pytorch_guard_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run("Plain PyTorch: rollback and skip", namespace())
    assert ns["guard"].step == 13
    assert list(thermo.load(tmp_path / "runs/exp2").scalars["step"]) == list(range(1, 13))


def test_lightning_snippet(tmp_path, monkeypatch):
    L = pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)

    class LitGPT(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = gpt()

        def training_step(self, batch, batch_idx):
            x, y, ids = batch
            return self.gpt(x, y)[1]

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    run("Lightning", namespace(lit_model=LitGPT()))
    assert list(thermo.load(tmp_path / "runs/pl").scalars["step"]) == list(range(1, 13))


def test_hugging_face_snippet(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install thermo[hf])")
    monkeypatch.chdir(tmp_path)
    tokens = TokenDataset(stdlib_bytes(100_000), 32)
    train = [{"input_ids": tokens[i][0], "labels": tokens[i][0]} for i in range(200)]
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32,
                                                                    vocab_size=256, n_positions=32))
    run("Hugging Face Trainer", namespace(hf_model=hf_model, train_dataset=train))
    assert list(thermo.load(tmp_path / "out/thermo").scalars["step"]) == list(range(1, 13))


def test_dropin_example_runs_and_writes_a_store(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("dropin", ROOT / "examples" / "dropin.py")
    dropin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dropin)
    dropin.main(["--run-dir", str(tmp_path / "run"), "--steps", "12"])
    assert "thermo inspect" in capsys.readouterr().out
    run_ = thermo.load(tmp_path / "run")
    assert list(run_.scalars["step"]) == list(range(12))
    assert {"h.0", "h.1.attn"} <= set(run_.layers["layer"]) and {"act_max", "attn_max"} <= set(run_.layers["stat"])
    # The example is three thermo lines in an ordinary loop.
    src = (ROOT / "examples" / "dropin.py").read_text()
    assert [line.split("# thermo (")[1][:3] for line in src.splitlines() if "# thermo (" in line] == ["1/3", "2/3", "3/3"]
