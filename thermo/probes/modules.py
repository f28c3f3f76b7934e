"""Which modules thermo watches, by class, by path and by shape: module-path patterns, the
transformer blocks, head counts, and the user's module under its wrappers."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch.nn as nn

# Class names (matched against the whole MRO, so subclasses count) watched by default.
DEFAULT_WATCH = ("Linear", "LayerNorm", "RMSNorm", "Embedding", "Conv1D")
# The layer name of the model itself when it is the attention module (its module path is "").
ROOT = "<root>"
_HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "nhead", "nheads", "heads")


def _pattern_regex(pattern: str) -> re.Pattern:
    """Module-path glob: ``*`` and ``?`` stay within one dotted component, ``**`` spans any
    number of them (``blocks.*`` is ``blocks.0``, not ``blocks.0.qkv``; ``**.attn`` is every
    ``attn`` at any depth)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**.", i):
            out.append(r"(?:.*\.)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def path_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether module path `name` matches one of the module-path globs (see `_pattern_regex`)."""
    return any(_pattern_regex(p).match(name) for p in patterns)


def pattern_candidates(pattern: str, names: list[str], limit: int = 12) -> str:
    """A short list of module paths a mistyped pattern may have meant: those whose last
    component matches the pattern's, else those at the pattern's depth, else all."""
    last = pattern.rsplit(".", 1)[-1]
    near = ([n for n in names if n and path_matches(n.rsplit(".", 1)[-1], (last,))]
            or [n for n in names if n and n.count(".") == pattern.count(".")] or [n for n in names if n])
    more = f" ... ({len(near) - limit} more)" if len(near) > limit else ""
    return ", ".join(near[:limit]) + more


def class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / DeepSpeed / torch.compile wrappers, so layer names do not
    depend on them."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # OptimizedModule from torch.compile
        elif type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            return model


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: members of a ModuleList/Sequential of >= 2 modules of
    one class that holds other modules (so a list of bare Linears is not a block stack)."""
    blocks = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) == 1 and any(True for _ in next(iter(mod)).children()):
            blocks.extend(f"{name}.{i}" if name else str(i) for i in range(len(mod)))
    return blocks


def head_count(module: nn.Module) -> int | None:
    """The number of attention heads a module declares, if it says so in a usual attribute."""
    for attr in _HEAD_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(module, "config", None)
    v = getattr(cfg, "num_attention_heads", None)
    return v if isinstance(v, int) and v > 0 else None
