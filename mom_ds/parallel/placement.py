"""Which rank owns which module of which routed block, and the transform that shards a
model's module pools over an expert-parallel group.

Placement: with expert-parallel size E, rank e of an expert-parallel group owns the
contiguous slice [e * A/E, (e+1) * A/E) of every routed block's attention pool and
[e * F/E, (e+1) * F/E) of its FFN pool. Contiguous slices keep the sort-by-module-id order of
a RoutePlan also sorted by destination rank, so the rows bound for one rank are contiguous
and no second permutation is needed before the all-to-all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..model.config import ConfigError, MoMConfig

POOLS = ("attn_modules", "ffn_modules")
_POOL_NAME = re.compile(r"^(chunks\.\d+\.(?:attn_modules|ffn_modules))\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ModulePlacement:
    n_modules: int
    ep_size: int
    ep_rank: int

    @property
    def per_rank(self) -> int:
        return self.n_modules // self.ep_size

    def owner(self, module: int) -> int:
        return module // self.per_rank

    def owned(self) -> range:
        return range(self.ep_rank * self.per_rank, (self.ep_rank + 1) * self.per_rank)


def validate_expert_parallel(config: MoMConfig, world_size: int, ep_size: int) -> None:
    """Refuse an expert-parallel size that cannot work, before any process group exists."""
    if ep_size < 1:
        raise ConfigError(f"parallel.expert_parallel_size = {ep_size}: must be >= 1. Fix: use 1 "
                          f"(no expert parallelism) or a divisor of the pool sizes.")
    if world_size % ep_size:
        raise ConfigError(f"parallel.expert_parallel_size = {ep_size} does not divide the "
                          f"data-parallel size {world_size}. Fix: launch a multiple of {ep_size} "
                          f"ranks or pick a divisor of {world_size}.")
    if ep_size > 1 and config.n_chunks == 0:
        raise ConfigError(f"parallel.expert_parallel_size = {ep_size} but the model has no "
                          f"routed blocks. Fix: use expert_parallel_size 1.")
    for name, pool in (("n_attn_modules", config.n_attn_modules),
                       ("n_ffn_modules", config.n_ffn_modules)):
        if config.n_chunks and pool % ep_size:
            raise ConfigError(f"parallel.expert_parallel_size = {ep_size} does not divide "
                              f"model.{name} = {pool}. Fix: choose a pool size that is a "
                              f"multiple of {ep_size}, or an expert-parallel size dividing {pool}.")


def is_expert_parameter(param: torch.Tensor) -> bool:
    return bool(getattr(param, "mom_expert", False))


def shard_module_pools(model: nn.Module, ep_size: int, ep_rank: int,
                       dispatcher_factory) -> nn.Module:
    """Keep in every routed block only this rank's modules, and install the dispatcher that
    sends each module's rows to its owner; dispatcher_factory(block_index, attn_placement,
    ffn_placement) builds it. The kept modules' parameters are tagged (`mom_expert`): their
    gradients are summed over the expert-data-parallel group by
    `expert.reduce_expert_gradients`, never averaged with other ranks' different modules."""
    config: MoMConfig = model.config
    validate_expert_parallel(config, ep_size, ep_size)
    for b, block in enumerate(model.chunks):
        placements = {}
        for pool_name, n in zip(POOLS, (config.n_attn_modules, config.n_ffn_modules)):
            placement = ModulePlacement(n, ep_size, ep_rank)
            placements[pool_name] = placement
            pool = getattr(block, pool_name)
            setattr(block, pool_name, nn.ModuleList(pool[i] for i in placement.owned()))
            for p in getattr(block, pool_name).parameters():
                p.mom_expert = True
        block.dispatcher = dispatcher_factory(b, placements["attn_modules"],
                                              placements["ffn_modules"])
    model.expert_parallel = (ep_size, ep_rank)  # the weights' layout
    return model


def local_to_global_name(name: str, ep_size: int, ep_rank: int, config: MoMConfig) -> str:
    """chunks.0.ffn_modules.1.fc.weight on ep_rank 1 of 2 (F = 4) -> ...ffn_modules.3..."""
    m = _POOL_NAME.match(name)
    if not m or ep_size == 1:
        return name
    n = config.n_attn_modules if m.group(1).endswith("attn_modules") else config.n_ffn_modules
    return f"{m.group(1)}.{ep_rank * (n // ep_size) + int(m.group(2))}.{m.group(3)}"


def global_to_local_name(name: str, ep_size: int, ep_rank: int, config: MoMConfig
                         ) -> Optional[str]:
    """The inverse; None when the global module belongs to another rank."""
    m = _POOL_NAME.match(name)
    if not m or ep_size == 1:
        return name
    n = config.n_attn_modules if m.group(1).endswith("attn_modules") else config.n_ffn_modules
    placement = ModulePlacement(n, ep_size, ep_rank)
    g = int(m.group(2))
    if placement.owner(g) != ep_rank:
        return None
    return f"{m.group(1)}.{g - placement.owned().start}.{m.group(3)}"
