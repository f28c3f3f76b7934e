"""thermo dropped into an existing plain PyTorch script: the three lines marked ``# thermo``.

An ordinary training loop (a small GPT on Python standard-library source, byte-level, on CPU).
The three lines attach the thermometers, record each step on the device without a host sync,
and flush to ``RUN/thermo.db`` every 10 steps; closing the ``with`` block flushes the rest and
removes every hook. Then look at the run::

    python examples/dropin.py --run-dir runs/dropin --steps 100
    thermo inspect runs/dropin
    thermo report runs/dropin -o runs/dropin/report.html

For rollback-and-skip as well, use `thermo.Guard` (the README, "Use with your loop").
"""

from __future__ import annotations

import argparse

import torch

import thermo  # thermo (1/3)
from thermo.corpus import TokenDataset, stdlib_bytes
from thermo.gpt import GPT, GPTConfig


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/dropin")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    dataset = TokenDataset(stdlib_bytes(200_000), block_size=64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    with thermo.Thermometer(model, run_dir=args.run_dir) as therm:  # thermo (2/3): attach before torch.compile
        for step, (x, y) in enumerate(loader):
            if step == args.steps:
                break
            _, loss = model(x, y)
            loss.backward()
            therm.step(loss)  # thermo (3/3): after backward, before zero_grad; no host sync
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    print(f"recorded {args.steps} steps to {args.run_dir}; try: thermo inspect {args.run_dir}")
    return args.run_dir


if __name__ == "__main__":
    main()
