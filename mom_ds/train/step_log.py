"""What a logging step reads: every number it prints or writes is reduced over ranks on the
device, then copied to the host in one transfer, so a logging interval costs one
device-to-host sync (the steps between read nothing of mom-ds's; tests/test_train_syncs.py
counts them). The health check of that step (health.py) reads its flags in the same
transfer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..model.mod_block import MoDRouting
from ..model.routed_block import BlockRouting
from .health import Health
from .monitor import RoutingStats, comm_totals, memory_gb


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as float64 host copies, in one device-to-host transfer."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    host = flat.cpu()
    return [part.view(t.shape) for t, part in zip(tensors, host.split([t.numel() for t in tensors]))]


@dataclass
class StepReading:
    """A logging step's numbers, on the host."""

    health: list[float]             # Health.reduced(), for Health.judge
    losses: dict[str, float]        # mean over micro-batches and ranks, by term
    memory_gb: float                # the largest peak memory of any rank
    grad_norm: Optional[float]
    routing: list[BlockRouting]     # summed over micro-batches and ranks
    mod_routing: list[MoDRouting]   # the last micro-batch's, this rank
    comm: dict[str, float]          # expert-parallel all-to-all totals ({} without)


def _grad_norm_tensor(grad_norm: Any) -> Optional[torch.Tensor]:
    """DeepSpeed's global gradient norm as a tensor when it is one (a device value to read
    with the rest), else None (a host float, or no norm)."""
    return grad_norm if isinstance(grad_norm, torch.Tensor) else None


def read_step(sums: dict[str, torch.Tensor], micro_batches: int, stats: RoutingStats,
              mod_routing: list[MoDRouting], health: Health, grad_norm: Any,
              model) -> StepReading:
    """Collective (every rank at the same step): the reductions, then the one transfer."""
    losses = torch.stack(list(sums.values())).to(torch.float64) / micro_batches
    dist.all_reduce(losses)
    stats.all_reduce()
    seen = health.reduced(torch.tensor(memory_gb(), dtype=torch.float64))
    comm = comm_totals(model)
    norm = _grad_norm_tensor(grad_norm)
    routing = [t for block in stats.blocks for t in block.tensors()]
    selected = [m.selected for m in mod_routing]
    parts = [seen, losses, *routing, *selected,
             *([comm] if comm is not None else []), *([norm] if norm is not None else [])]
    host = iter(to_host(parts))
    seen, losses = next(host).tolist(), next(host) / dist.get_world_size()
    blocks = [BlockRouting(*(next(host) for _ in block.tensors()), calls=block.calls)
              for block in stats.blocks]
    mods = [MoDRouting(next(host), None) for _ in selected]
    comm_host = {}
    if comm is not None:
        sent, seconds = next(host).tolist()
        comm_host = {"all_to_all_bytes": sent, "all_to_all_seconds": seconds}
    if norm is not None:
        grad_norm = float(next(host))
    return StepReading(health=seen, losses=dict(zip(sums, losses.tolist())),
                       memory_gb=seen[5], grad_norm=None if grad_norm is None else float(grad_norm),
                       routing=blocks, mod_routing=mods, comm=comm_host)
