"""What a logging step reads: every number it prints or writes is reduced over ranks on the
device, then copied to the host in one transfer, so a logging interval costs one
device-to-host sync (the steps between read nothing of mom-ds's; tests/train/test_train_syncs.py
counts them). The health check of that step (health.py) reads its flags in the same
transfer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..model.routing import RoutingRecord
from .health import Health
from .monitor import memory_gb


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
    routing: RoutingRecord          # summed over micro-batches and ranks, with comm


def _grad_norm_tensor(grad_norm: Any) -> Optional[torch.Tensor]:
    """DeepSpeed's global gradient norm as a tensor when it is one (a device value to read
    with the rest), else None (a host float, or no norm)."""
    return grad_norm if isinstance(grad_norm, torch.Tensor) else None


def comm_since_last(model) -> Optional[torch.Tensor]:
    """(2,) float64 on the device: this rank's expert-parallel all-to-all bytes sent and
    seconds exchanging since the last call (the dispatchers' host counters restart); None
    without expert parallelism."""
    dispatchers = [d for block in getattr(model, "chunks", [])
                   for d in (block.attn_dispatcher, block.ffn_dispatcher)
                   if hasattr(d, "take_comm_stats")]
    if not dispatchers:
        return None
    taken = [d.take_comm_stats() for d in dispatchers]
    return torch.tensor([float(sum(t[0] for t in taken)), sum(t[1] for t in taken)],
                        dtype=torch.float64, device=next(model.parameters()).device)


def read_step(sums: dict[str, torch.Tensor], micro_batches: int, routing: RoutingRecord,
              health: Health, grad_norm: Any, model) -> StepReading:
    """Collective (every rank at the same step): the reductions, then the one transfer.
    routing: the step's micro-batches summed (RoutingRecord +); it gets the all-to-all
    totals and is summed over ranks in its one collective."""
    losses = torch.stack(list(sums.values())).to(torch.float64) / micro_batches
    dist.all_reduce(losses)
    if routing.calls:
        routing.comm = comm_since_last(model)
        routing = routing.all_reduced()
    seen = health.reduced(torch.tensor(memory_gb(), dtype=torch.float64))
    norm = _grad_norm_tensor(grad_norm)
    recorded = routing.tensors() if routing.calls else []
    parts = [seen, losses, *recorded, *([norm] if norm is not None else [])]
    host = iter(to_host(parts))
    seen, losses = next(host).tolist(), next(host) / dist.get_world_size()
    if recorded:
        routing = routing.replaced(host)  # takes exactly the record's tensors
    if norm is not None:
        grad_norm = float(next(host))
    return StepReading(health=seen, losses=dict(zip(sums, losses.tolist())),
                       memory_gb=seen[5], grad_norm=None if grad_norm is None else float(grad_norm),
                       routing=routing)
