"""train.compile: torch.compile the parts of a model that run without a host sync.

Compiled: every vanilla layer (attention + MLP, the whole layer), every Mixture-of-Depths
block (its top-k is over a static k) and every learned router (the GRU or MLP, softmax,
top-k and balancing loss). Left eager: the routed blocks' module pools, whose grouped
computation either splits rows by per-module counts on the host (the CPU's loop path,
expert parallelism's all-to-all) or calls grouped_mm with device offsets, which torch's
compiler does not trace yet; compiling the block whole would break its graph at every
such point. Each part is compiled in place (nn.Module.compile), so parameter names,
checkpoints and DeepSpeed's parameter groups are unchanged.
"""
from __future__ import annotations

from torch import nn

from .mod_block import MoDBlock
from .modules import VanillaLayer
from .routers import Router


def compile_parts(model: nn.Module) -> int:
    """Compile the parts of `model` named above, in place; returns how many."""
    parts: list[nn.Module] = []
    taken: set[int] = set()  # submodules of a compiled part (a MoD block's own layer)
    for m in model.modules():  # parents come before their children
        if id(m) not in taken and (isinstance(m, (VanillaLayer, MoDBlock))
                                   or (isinstance(m, Router) and m.learned)):
            parts.append(m)
            taken.update(id(sub) for sub in m.modules())
    for part in parts:
        part.compile()
    return len(parts)
