"""thermo/probes/logits.py: flex_attention's logits read through the probes, against a float64
recomputation (the model zoo checks the sdpa, softmax and nn.MultiheadAttention readers)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import thermo
from tests.reference import assert_close, forbid_host_syncs

flex = pytest.importorskip("torch.nn.attention.flex_attention")

B, H, T, E = 2, 2, 8, 4
LENGTHS = torch.tensor([8, 5])  # the second sequence has three padding positions


def padding(b, h, q_idx, kv_idx):
    return kv_idx < LENGTHS[b]  # reads the batch index


def documents(score, b, h, q_idx, kv_idx):
    # A score_mod that masks by itself: keys 0-3 and 4-7 are two documents.
    return torch.where(q_idx // 4 == kv_idx // 4, score * (h + 1), -float("inf"))


class Flex(nn.Module):
    """One flex_attention call over the projected input, with what the test passes in."""

    def __init__(self, score_mod=None, mask_mod=None):
        super().__init__()
        self.qk = nn.Linear(E, 2 * H * E)
        self.score_mod, self.mask_mod = score_mod, mask_mod

    def project(self, x):
        q, k = self.qk(x).view(B, T, 2, H, E).permute(2, 0, 3, 1, 4)  # each (B, H, T, E)
        return q, k

    def forward(self, x):
        q, k = self.project(x)
        mask = None
        if self.mask_mod is not None:
            mask = flex.create_block_mask(self.mask_mod, B, None, T, T, device=x.device)
        return flex.flex_attention(q, k, k, score_mod=self.score_mod, block_mask=mask)


def reference(model, x):
    """(max, min, max |logit|) of what flex_attention's softmax sees, in float64."""
    with torch.no_grad():
        q, k = (t.double() for t in model.project(x))
    s = q @ k.transpose(-2, -1) * E**-0.5
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1)
    i, j = torch.arange(T).view(1, 1, T, 1), torch.arange(T).view(1, 1, 1, T)
    if model.score_mod is not None:
        s = model.score_mod(s, b, h, i, j)
    keep = s > -float("inf")
    if model.mask_mod is not None:
        keep = keep & model.mask_mod(b, h, i, j)
    s = s[keep.expand_as(s)]
    return s.max().item(), s.min().item(), s.abs().max().item()


def run(model, steps=3, monkeypatch=None, **cfg):
    torch.manual_seed(0)
    xs = torch.randn(steps, B, T, E)
    armed = forbid_host_syncs(monkeypatch) if monkeypatch is not None else {"on": False}
    # flex_attention compiles its op at each call. With a cache left by other tests' flex calls (other
    # shapes), dynamo recompiles here with dynamic shapes inside an armed step, and that tracing reads
    # constants with .item(): compile time, not the step's. An empty cache compiles as a fresh process does.
    torch._dynamo.reset()
    therm = thermo.Thermometer(model, flush_every=steps, **cfg)
    records, want = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        for i, x in enumerate(xs):
            armed["on"] = 0 < i < steps - 1  # the first step finds the layers; the last flushes
            with torch.no_grad():  # torch has no flex_attention backward on CPU
                out = model(x)
            records += therm.step(out.square().mean())
            armed["on"] = False
            want.append(reference(model, x))
    therm.close()
    assert [layer.name for layer in therm.layers if layer.kind == "attention"] == ["<root>"]
    return records, want


@pytest.mark.parametrize("score_mod, mask_mod", [(documents, padding), (None, padding), (documents, None)],
                         ids=["score_mod+block_mask", "block_mask", "score_mod"])
def test_flex_logits_are_exact_without_a_host_sync(score_mod, mask_mod, monkeypatch):
    records, want = run(Flex(score_mod, mask_mod), attn_every=1, monkeypatch=monkeypatch)
    for rec, (mx, mn, absmax) in zip(records, want):
        assert_close(rec.layers[("<root>", "attn_max")], mx, 1e-5, f"step {rec.step} max")
        assert_close(rec.layers[("<root>", "attn_min")], mn, 1e-5, f"step {rec.step} min")
        bound = rec.layers.get(("<root>", "attn_bound"), -float("inf"))
        if score_mod is None:  # q·kᵀ·scale as it is: the Cauchy-Schwarz bound holds
            assert bound >= absmax * (1 - 1e-6)
        else:  # a score_mod could add anything: no bound
            assert bound == -float("inf")


def test_flex_bound_on_unsampled_steps():
    records, want = run(Flex(None, padding), steps=4, attn_every=2)
    for rec, (_, _, absmax) in zip(records, want):
        assert rec.layers[("<root>", "attn_bound")] >= absmax * (1 - 1e-6)
    assert [("<root>", "attn_max") in rec.layers for rec in records] == [True, False, True, False]
