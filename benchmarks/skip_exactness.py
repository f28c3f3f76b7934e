"""How much a "skipped" step still moves the model, per optimizer, implementation and skip mode.

    python benchmarks/skip_exactness.py [--n-layer 2 --n-embd 64 --warm 5]

For Adam, AdamW (weight decay 0.1) and SGD (momentum 0.9, weight decay 0.1), each as torch's fused,
foreach and for-loop implementation, and each mask thermo offers (`GuardConfig.skip_mode`:
``fused`` where the optimizer is fused, ``snapshot``, ``zero_grad``), it trains a small GPT (the
reference loop's model, fp32, CPU or CUDA) for a few warm-up steps, then feeds rung 1 a step whose
loss is non-finite and measures what the skipped step changed:

* max |Δparam|: the largest change of any parameter element (goal: exactly 0);
* skipped/normal: the norm of the skipped step's parameter change over that of a normal step from
  the same state (the issue measured 85-95% for zero_grad with foreach/for-loop AdamW);
* max |Δstate|: the largest change of any optimizer state element (exp_avg, exp_avg_sq, step,
  momentum_buffer; a step counter that advanced shows as 1);
* extra MiB: device memory the mask holds (the snapshot's copies).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import warnings

import torch

from thermo.gpt import GPT, GPTConfig
from thermo.guard import GuardConfig, _DeviceSkip

OPTIMIZERS = {
    "Adam": lambda p, **kw: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1, **kw),
    "AdamW": lambda p, **kw: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, **kw),
    "SGD": lambda p, **kw: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1, **kw),
}
IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def state_of(opt) -> list[torch.Tensor]:
    return [v.detach().clone() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        return float("nan")  # the step created or dropped state
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(a, b)), default=0.0)


def update_norm(before, after) -> float:
    return sum(((x.double() - y.double()) ** 2).sum().item() for x, y in zip(before, after)) ** 0.5


def measure(args, name: str, impl: str, mode: str, device) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, block_size=64)).to(device)
    opt = OPTIMIZERS[name](model.parameters(), **IMPLS[impl])
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the snapshot's memory warning: its figure is a column here
        skip = _DeviceSkip(GuardConfig(skip_z=None, skip_mode=mode), opt, params, device)
    g = torch.Generator().manual_seed(1)

    def batch():
        x = torch.randint(0, 256, (8, 65), generator=g).to(device)
        return x[:, :-1], x[:, 1:]

    def step(poison: bool) -> None:
        x, y = batch()
        _, loss = model(x, y)
        loss.backward()
        skip(loss * float("nan") if poison else loss, torch.ones((), device=device))
        opt.step()
        skip.restore()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warm):
        step(poison=False)
    p0, s0 = [p.detach().clone() for p in params], state_of(opt)
    # A normal step from the same state (on a copy), for the ratio.
    twin_model = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[name](twin_model.parameters(), **IMPLS[impl])
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the tensors
    x, y = batch()
    g_state = g.get_state()
    _, loss = twin_model(x, y)
    loss.backward()
    twin_opt.step()
    normal = update_norm(p0, [p.detach() for p in twin_model.parameters()])
    g.set_state(g_state)  # the skipped step reads another batch; its size is what matters
    step(poison=True)
    p1, s1 = [p.detach().clone() for p in params], state_of(opt)
    out = {
        "optimizer": name, "impl": impl, "mode": skip.mode,
        "max_dparam": max_abs_diff(p0, p1),
        "ratio": update_norm(p0, p1) / normal if normal > 0 else float("nan"),
        "max_dstate": max_abs_diff(s0, s1),
        "extra_mib": skip.extra_bytes / 2**20,
        "param_mib": sum(p.numel() * p.element_size() for p in params) / 2**20,
    }
    skip.remove()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--warm", type=int, default=5, help="normal steps before the skipped one")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in OPTIMIZERS:
        for impl in IMPLS:
            modes = (["fused"] if impl == "fused" else []) + ["snapshot", "zero_grad"]
            rows.extend(measure(args, name, impl, mode, device) for mode in modes)
    print(f"# skip exactness: GPT {args.n_layer} layers d={args.n_embd} ({rows[0]['param_mib']:.2f} MiB fp32 "
          f"params), {args.warm} warm-up steps; {platform.machine()} {device.type}, torch {torch.__version__}, "
          f"{datetime.date.today()}")
    print("| optimizer | implementation | mode | max abs(dparam) | skipped/normal update | max abs(dstate) | extra MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['impl']} | {r['mode']} | {r['max_dparam']:.3g} | {r['ratio']:.1%} | "
              f"{r['max_dstate']:.3g} | {r['extra_mib']:.2f} |")


if __name__ == "__main__":
    main()
