"""2-rank checkpoint round trip under FSDP2 and DDP + ZeroRedundancyOptimizer (torchrun, gloo).

For each mode: run A trains 3 steps, saves, trains 3 more; run B builds everything afresh
(another init, empty optimizer), restores the checkpoint and trains the same 3 steps. Each rank
compares its local shards, RNG and data position bit for bit; rank 0 writes ``OUT/result.json``
and, for the one-process restore test, the full state at the checkpoint (``OUT/MODE/full.pt``).

Usage: torchrun --nproc_per_node=2 --standalone tests/dist/ckpt_roundtrip.py OUT
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from thermo.checkpoints import Checkpoints
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.data import ResumableSampler
from thermo.gpt import GPT, GPTConfig

CFG = GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=32, dropout=0.1)  # dropout: RNG matters
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(mode: str, init_seed: int, ds: TokenDataset):
    torch.manual_seed(init_seed)
    model = GPT(CFG)
    if mode == "fsdp2":
        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    else:
        model = DDP(model)
        opt = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW, lr=3e-3, weight_decay=0.1
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1.0 + 0.5 * i))
    torch.manual_seed(1000 + init_seed + dist.get_rank())  # per-rank dropout streams
    return model, opt, sched, ResumableSampler(ds, 8, seed=0)


def train(model, opt, sched, sampler, ds, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x, y = ds.batch(sampler.local(sampler.next_global_batch()))
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / dist.get_world_size())
    return losses


def local_snapshot(model, opt) -> dict[str, torch.Tensor]:
    """This rank's own tensors: model (local shards) and optimizer state, keyed by name."""

    def local(t):
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    snap = {f"model.{k}": local(v) for k, v in model.state_dict().items()}
    inner = opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt
    osd = inner.state_dict()
    for i, st in osd["state"].items():
        for k, v in st.items():
            snap[f"optim.{i}.{k}"] = local(v) if torch.is_tensor(v) else torch.tensor(v)
    for g, group in enumerate(opt.param_groups):
        snap[f"lr.{g}"] = torch.tensor(group["lr"], dtype=torch.float64)
    return snap


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def full_state(mode: str, model, opt) -> dict | None:
    """A copy of the whole model and optimizer state (per parameter name) on rank 0."""
    if mode == "fsdp2":
        msd, osd = get_state_dict(model, opt, options=FULL)
        # deepcopy: tensors already on the CPU come back as the live ones, not copies
        return copy.deepcopy({"model": msd, "optim": osd["state"]}) if dist.get_rank() == 0 else None
    msd = get_model_state_dict(model, options=FULL)
    opt.consolidate_state_dict(to=0)
    if dist.get_rank() != 0:
        return None
    names = [n for n, _ in model.module.named_parameters()]
    optim = {names[i]: s for i, s in opt.state_dict()["state"].items()}
    return copy.deepcopy({"model": msd, "optim": optim})


def all_ranks(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def run(mode: str, out: Path, ds: TokenDataset) -> dict:
    run_dir = out / mode
    ckpts = Checkpoints(run_dir, keep_last=2, good_after=3)

    # Run A: uninterrupted.
    model, opt, sched, sampler = build(mode, 0, ds)
    train(model, opt, sched, sampler, ds, 3)
    ckpts.save(3, model, opt, sched, data=sampler.state_dict(), extra={"mode": mode, "inf": float("inf")})
    at_save = local_snapshot(model, opt)
    rng_at_save = torch.get_rng_state()
    data_at_save = sampler.state_dict()
    full = full_state(mode, model, opt)
    losses_a = train(model, opt, sched, sampler, ds, 3)
    end_a = local_snapshot(model, opt)
    ckpts.promote(6)
    del model, opt, sched, sampler

    # Run B: everything fresh and different, then restore.
    model, opt, sched, sampler = build(mode, 1, ds)
    differs_before = not same(local_snapshot(model, opt), at_save)
    entry = ckpts.newest_good()  # rank 0 decides, every rank gets the answer
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, entry)
    restored = ckpts.restore(entry, model, opt, sched)
    exact = same(local_snapshot(model, opt), at_save)
    rng_exact = torch.equal(torch.get_rng_state(), rng_at_save)
    sampler.load_state_dict(restored["data"])
    losses_b = train(model, opt, sched, sampler, ds, 3)
    end_exact = same(local_snapshot(model, opt), end_a)

    if dist.get_rank() == 0:
        torch.save(full, run_dir / "full.pt")
    return {
        "entry_step": entry.step if entry else None,
        "entry_same_on_all_ranks": all(e == seen[0] for e in seen),
        "differs_before": all_ranks(differs_before),
        "restore_exact": all_ranks(exact),
        "rng_exact": all_ranks(rng_exact),
        "data_exact": all_ranks(restored["data"] == data_at_save),
        "extra": restored["extra"],
        "losses_a": losses_a,
        "losses_b": losses_b,
        "end_exact": all_ranks(end_exact),
        "world_size": entry.world_size if entry else None,
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    ds = TokenDataset(stdlib_bytes(100_000), block_size=CFG.block_size)
    result = {mode: run(mode, out, ds) for mode in ("fsdp2", "zero1")}
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()  # ranks finish unevenly: see MACHINE_NOTES
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
