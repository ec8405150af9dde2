"""train.compile: torch.compile the parts of a model that run without a host sync.

Compiled: every vanilla layer (attention + MLP, the whole layer), every Mixture-of-Depths
block (its top-k is over a static k), every routed block whose pools live in this process
(E = 1, or pools expert parallelism leaves dense): routers, plans, the grouped GEMM
(mom_ds::grouped_mm, a custom operator the compiler sees as one node) and the attention
of all H steps in one graph with no break (tests/model/test_model_compile.py). A routed block
whose pools are sharded (E > 1) stays eager but for its learned routers: its all-to-all
splits rows by counts read on the host, which would break the graph at every exchange.
Each part is compiled in place (nn.Module.compile), so parameter names, checkpoints and
DeepSpeed's parameter groups are unchanged.
"""
from __future__ import annotations

from torch import nn

from .dispatch import LocalDispatcher
from .mod_block import MoDBlock
from .modules import VanillaLayer
from .routed_block import RoutedBlock
from .routers import Router


def _local(block: RoutedBlock) -> bool:
    return all(type(d) is LocalDispatcher for d in (block.attn_dispatcher, block.ffn_dispatcher))


def compile_parts(model: nn.Module) -> int:
    """Compile the parts of `model` named above, in place; returns how many."""
    parts: list[nn.Module] = []
    taken: set[int] = set()  # submodules of a compiled part (a MoD block's own layer)
    for m in model.modules():  # parents come before their children
        if id(m) not in taken and (isinstance(m, (VanillaLayer, MoDBlock))
                                   or (isinstance(m, RoutedBlock) and _local(m))
                                   or (isinstance(m, Router) and m.learned)):
            parts.append(m)
            taken.update(id(sub) for sub in m.modules())
    for part in parts:
        part.compile()
    return len(parts)
