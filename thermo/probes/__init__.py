"""What thermo watches and how.

- `modules`: which modules are watched (classes, module-path patterns, transformer blocks).
- `activations`: forward hooks for output and output-gradient extremes; the global grad norm.
- `logits`: the attention logits read from the arguments of an attention call (sdpa, a softmax
  over q @ kᵀ, ``nn.MultiheadAttention``, ``flex_attention``), one definition on every path.
- `attention`: the finder that, on the first forward, sees which modules compute attention, and
  the probe pushed around each of them afterwards.

The names below are what the rest of thermo imports. Every probe writes into preallocated views
of the thermometer's device accumulators with in-place ``max``/``min``; nothing here reads a value
back to the host.
"""

from thermo.probes.activations import ActivationHook, grad_norm_and_nonfinite
from thermo.probes.attention import AttentionFinder, AttentionProbe, AttentionSlots, Found
from thermo.probes.modules import (
    DEFAULT_WATCH,
    ROOT,
    class_names,
    find_blocks,
    head_count,
    path_matches,
    pattern_candidates,
    unwrap,
)

__all__ = [
    "DEFAULT_WATCH",
    "ROOT",
    "ActivationHook",
    "AttentionFinder",
    "AttentionProbe",
    "AttentionSlots",
    "Found",
    "class_names",
    "find_blocks",
    "grad_norm_and_nonfinite",
    "head_count",
    "path_matches",
    "pattern_candidates",
    "unwrap",
]
