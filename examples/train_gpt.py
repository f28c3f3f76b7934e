"""The reference loop: a bf16/tf32 GPT under torchrun (FSDP2 or ZeRO-1) with the thermo Guard.

The loop itself is thermo/train_gpt.py, shipped inside the package so that `thermo demo` runs
from any install; read it there. This file runs it:

    python examples/train_gpt.py --run-dir runs/a --steps 300 --poison-steps 150-152
    torchrun --nproc_per_node=2 examples/train_gpt.py --shard fsdp --dtype bf16 --run-dir runs/b
    torchrun --nproc_per_node=2 examples/train_gpt.py --shard zero1 --run-dir runs/c
"""

import sys

from thermo.train_gpt import main

if __name__ == "__main__":
    sys.exit(main())
