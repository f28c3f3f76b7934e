"""2-rank exactness check, launched by tests/test_distributed.py under torchrun (gloo, CPU).

Each rank trains a sharded copy of the same GPT (FSDP2 or DDP + ZeroRedundancyOptimizer) on its
half of a global batch with a Thermometer attached, while an unsharded reference copy trains on
the whole global batch in one process. Rank 0 writes what thermo recorded and what the plain
recomputation expects to a JSON file for the test to compare.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import thermo  # noqa: E402
from tests.reference import QKVCapture, Recorder, grad_norm  # noqa: E402
from thermo.gpt import GPT, GPTConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", choices=["fsdp", "zero1"], required=True)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16))
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    amp = torch.bfloat16 if args.dtype == "bf16" else None

    if args.shard == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
        opt = ZeroRedundancyOptimizer(wrapped.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)

    therm = thermo.Thermometer(wrapped, run_dir=args.run_dir if rank == 0 else None,
                               flush_every=2, attn_every=1)
    layers = [layer.name for layer in therm.layers if layer.kind != "attention"]
    blocks = [layer.name for layer in therm.layers if layer.kind == "block"]
    # Attention layers are found on the first forward (thermo's finder); this model's are known.
    attn = [f"h.{i}.attn" for i in range(len(model.h))]
    rec = Recorder(model, layers, grad_names=blocks)
    qkv = QKVCapture(model, attn, n_head=4)

    g = torch.Generator().manual_seed(1)
    B = 4 * world
    recorded, expected = [], []
    for step in range(args.steps):
        data = torch.randint(0, 256, (B, 17), generator=g)
        mine = data[rank * 4 : (rank + 1) * 4]
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            _, loss = wrapped(mine[:, :-1], mine[:, 1:])
        loss.backward()
        recorded += therm.step(loss)
        opt.step()
        opt.zero_grad()

        # What the ranks saw, reduced in plain Python: max of max, min of min.
        acts = rec.take()
        logits = qkv.take()
        gathered = [None] * world
        dist.all_gather_object(gathered, (acts, logits))
        want = {}
        for acts_r, logits_r in gathered:
            for (layer, stat), v in acts_r.items():
                key = f"{layer}|{stat}"
                op = min if stat.endswith("min") else max
                want[key] = v if key not in want else op(want[key], v)
            for layer, (mx, mn) in logits_r.items():
                want[f"{layer}|attn_max"] = max(want.get(f"{layer}|attn_max", -1e30), mx)
                want[f"{layer}|attn_min"] = min(want.get(f"{layer}|attn_min", 1e30), mn)

        # The single-process reference on the same global batch: under bf16 it sees the same
        # micro-batches the ranks do, since each rank rounds its own bf16 sums.
        if amp is None:
            _, ref_loss = ref(data[:, :-1], data[:, 1:])
            ref_loss.backward()
            ref_loss = ref_loss.item()
        else:
            ref_loss = 0.0
            for r in range(world):
                part = data[r * 4 : (r + 1) * 4]
                with torch.autocast("cpu", dtype=amp):
                    _, l = ref(part[:, :-1], part[:, 1:])
                (l / world).backward()
                ref_loss += l.item() / world
        want["grad_norm"] = grad_norm(ref)
        want["loss"] = ref_loss
        expected.append(want)
        ref_opt.step()
        ref_opt.zero_grad()

    recorded += therm.flush()
    therm.close()
    if rank == 0:
        out = {
            "recorded": [
                {"step": r.step, "scalars": r.scalars,
                 "layers": {f"{k[0]}|{k[1]}": v for k, v in r.layers.items()}}
                for r in recorded
            ],
            "expected": expected,
        }
        with open(args.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
