"""2-rank check of QK-Clip, launched by tests/test_qkclip.py under torchrun (gloo, CPU).

Each rank feeds its own batch to a GPT (replicated, or FSDP2-sharded: DTensor weights) whose
head 1 of layer 0 is made hot. QK-Clip MAX-reduces the per-head logits, so both ranks scale alike:
afterwards the max over ranks of the hot head's logit is tau, the layer's other heads are
unchanged, and (replicated) the ranks' weights are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import thermo  # noqa: E402
from thermo.gpt import GPT, GPTConfig  # noqa: E402
from thermo.guard.qkclip import QKClip  # noqa: E402


def global_head_max(therm, loss_fn) -> torch.Tensor:
    loss = loss_fn()
    v = therm.attention_head_max()["h.0.attn"].clone()
    therm.step(loss.detach())
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return v


def run(setup: str, rank: int) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16))
    with torch.no_grad():  # head 1's queries large, and non-zero biases
        w = model.h[0].attn.c_attn
        w.weight[8:16] = 2.0 * torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
        w.bias.copy_(0.1 * torch.randn(96, generator=torch.Generator().manual_seed(3)))
    if setup == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(10 + rank))
    loss_fn = lambda: model(x, x)[1]  # noqa: E731
    therm = thermo.Thermometer(model, attn_per_head=True, attn_every=1, flush_every=50)
    therm.step(loss_fn().detach())  # the thermometer lays out its attention layers
    s0 = global_head_max(therm, loss_fn)
    tau = float(s0[1]) / 4
    clip = QKClip(therm, tau=tau)
    loss = loss_fn()
    hot = clip.capture()
    therm.step(loss.detach())
    clip.apply()
    s1 = global_head_max(therm, loss_fn)
    out = {"hot": hot.item(), "tau": tau, "after": float(s1[1]),
           "others_unchanged": all(torch.equal(s0[h], s1[h]) for h in (0, 2, 3)), "identical": None}
    if setup == "plain":
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(every, flat)
        out["identical"] = all(torch.equal(every[0], e) for e in every)
    therm.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for setup in ("plain", "fsdp2"):
        r = run(setup, rank)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, r)
        result[setup] = every
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
