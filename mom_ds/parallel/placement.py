"""Which rank owns which module of which pool, and which pools expert parallelism shards.

With expert-parallel size E, rank e of an expert-parallel group owns the contiguous slice
[e * n/E, (e+1) * n/E) of a sharded pool's n modules: row slice e of every stacked tensor.
Contiguous slices keep the sort-by-module order of a RoutePlan also sorted by destination
rank, so the rows bound for one rank are contiguous and no second permutation is needed
before the all-to-all.

A pool of one module, one that E does not divide, or one behind a fixed router (every
token goes to the same module at a step) stays dense: replicated and data-parallel like
every other parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ConfigError, MoMConfig

POOLS = ("attn_pool", "ffn_pool")


@dataclass(frozen=True)
class ModulePlacement:
    n_modules: int
    ep_size: int
    ep_rank: int

    @property
    def per_rank(self) -> int:
        return self.n_modules // self.ep_size

    def owned(self) -> slice:
        return slice(self.ep_rank * self.per_rank, (self.ep_rank + 1) * self.per_rank)


def sharded_pools(config: MoMConfig, ep_size: int) -> tuple[str, ...]:
    """The pools (of POOLS) that expert parallelism of size ep_size shards."""
    if ep_size == 1 or not config.n_routed_blocks:
        return ()
    pools = (("attn_pool", config.n_attn_modules, config.attn_router_kind),
             ("ffn_pool", config.n_ffn_modules, config.ffn_router_kind))
    return tuple(name for name, n, router in pools
                 if n > 1 and n % ep_size == 0 and router != "fixed")


def describe_placement(config: MoMConfig, ep_size: int) -> str:
    """One line for the run's start: what is sharded and what stays dense, and why."""
    sharded = sharded_pools(config, ep_size)
    if ep_size == 1:
        return "expert_parallel_size 1: every module pool is data-parallel"
    parts = []
    for name, n, router in (("attn_pool", config.n_attn_modules, config.attn_router_kind),
                            ("ffn_pool", config.n_ffn_modules, config.ffn_router_kind)):
        if not config.n_routed_blocks:
            break
        kind = "attention" if name == "attn_pool" else "FFN"
        if name in sharded:
            parts.append(f"{kind} pools sharded ({n // ep_size} of {n} modules per rank)")
        else:
            why = ("a fixed router" if router == "fixed" else "one module" if n == 1
                   else f"{ep_size} does not divide {n}")
            parts.append(f"{kind} pools dense ({why})")
    return f"expert_parallel_size {ep_size}: " + ("; ".join(parts) or "no routed blocks, "
                                                  "every parameter is data-parallel")


def validate_expert_parallel(world_size: int, ep_size: int) -> None:
    """Refuse an expert-parallel size that cannot work, before any process group exists."""
    if ep_size < 1:
        raise ConfigError(f"parallel.expert_parallel_size = {ep_size}: must be >= 1. Fix: use 1 "
                          f"(no expert parallelism) or a divisor of the pool sizes.")
    if world_size % ep_size:
        raise ConfigError(f"parallel.expert_parallel_size = {ep_size} does not divide the "
                          f"data-parallel size {world_size}. Fix: launch a multiple of {ep_size} "
                          f"ranks or pick a divisor of {world_size}.")
