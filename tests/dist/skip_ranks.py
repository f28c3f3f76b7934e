"""2-rank check of rung 1, launched by tests/test_skip.py under torchrun (gloo, CPU).

Only rank 1's loss is non-finite at step 2. Both ranks must skip it (the flag is reduced across
ranks), leave their parameters untouched, and stay identical to each other: replicated (same data
on both ranks), DDP + ZeroRedundancyOptimizer, and FSDP2 (DTensor parameters and state). The
optimizer is foreach AdamW, so the skip is the snapshot-and-restore one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from thermo.guard import GuardConfig, _DeviceSkip  # noqa: E402


def local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def run(setup: str, rank: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    params = list(model.parameters())
    if setup == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
        opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-2, foreach=True)
    elif setup == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
        wrapped = model
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    else:
        wrapped = model
        opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skip = _DeviceSkip(GuardConfig(skip_z=None), opt, params, torch.device("cpu"))
    assert skip.mode == "snapshot", skip.mode
    flags, unchanged = [], None
    for step in (1, 2, 3):
        seed = step if setup == "plain" else 100 * step + rank  # plain: both ranks see the same data
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
        loss = wrapped(x).square().mean()
        loss.backward()
        told = loss * float("nan") if (step == 2 and rank == 1) else loss
        before = [local(p).detach().clone() for p in params]
        flags.append(skip(told, torch.tensor(1.0)).item())
        opt.step()  # restored in the step post-hook (ZeRO-1: after its broadcast)
        opt.zero_grad(set_to_none=True)
        if step == 2:
            unchanged = all(torch.equal(a, local(p)) for a, p in zip(before, params))
    identical = None  # FSDP2 holds each parameter once, in shards of unequal size: nothing to compare
    if setup != "fsdp2":
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        identical = all(torch.equal(gathered[0], g) for g in gathered)
    return {"flags": flags, "unchanged": unchanged, "identical": identical}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for setup in ("plain", "zero1", "fsdp2"):
        r = run(setup, rank)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, r)
        result[setup] = {"flags": [e["flags"] for e in every],
                         "skipped_step_unchanged": [e["unchanged"] for e in every],
                         "ranks_identical": all(e["identical"] is not False for e in every)}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
