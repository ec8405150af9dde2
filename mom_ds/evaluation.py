"""The one evaluator: which windows are "the validation windows", and how a model is scored
on a set of windows (mean token cross-entropy, perplexity, forward FLOPs per token of the
routing executed, routing statistics).

Training's evaluation (through the DeepSpeed engine, every rank its share), mom-eval (one
process), the modular assembly search, the learned-path scoring and the benchmarks all call
`score`. Its number is exactly reproducible: each micro-batch's token-summed loss goes into
its own slot of a float64 vector (slot b * W + r: rank r's b-th micro-batch), each rank
fills only its own slots, the ranks' vectors are summed by one all-reduce (adding zeros is
exact), and the mean is the correctly rounded sum (math.fsum) over the tokens. One process
that scores the same windows in the same micro-batches (mom-eval's default: the run's
micro_batch_size, grouped as each rank read them) gets the same number, bit for bit, as
the run's last evaluation of that checkpoint.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from .data import WindowSampler
from .model.flops import flops_per_token
from .model.routing import RoutingRecord


@dataclass(frozen=True)
class Windows:
    """A set of windows to score, in micro-batches.

    source: where the windows are read: a TokenizedDataset (`.windows(indices)`) or an
    int64 tensor of rows (N, seq_len + 1).
    batches: each micro-batch's window indices, in slot order: slot b * world_size + r is
    rank r's b-th micro-batch.
    """

    source: Any
    batches: tuple[tuple[int, ...], ...]
    world_size: int = 1

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.batches)

    def regrouped(self, batch_size: int) -> "Windows":
        """The same windows in the same order, in batches of batch_size on one rank."""
        order = [w for b in self.batches for w in b]
        return Windows(self.source, tuple(tuple(order[i:i + batch_size])
                                          for i in range(0, len(order), batch_size)))

    def read(self, slot: int, device: torch.device) -> torch.Tensor:
        """The slot's windows as int64 rows on `device` (as training's Batches reads them)."""
        indices = self.batches[slot]
        if isinstance(self.source, torch.Tensor):
            return self.source[list(indices)].to(torch.int64).to(device)
        return torch.from_numpy(np.asarray(self.source.windows(indices)).astype(np.int64)
                                ).to(device)


def validation_windows(data, eval_batches: int, micro_batch_size: int,
                       world_size: int) -> Windows:
    """The validation windows of a run: rank r of W reads WindowSampler(seed 0, rank r, W)
    in eval_batches micro-batches of micro_batch_size, as training's validation does
    (eval_batches x micro_batch_size x W windows in all)."""
    per_rank = []
    for rank in range(world_size):
        order = WindowSampler(len(data), seed=0, rank=rank, world_size=world_size)
        per_rank.append([tuple(next(order) for _ in range(micro_batch_size))
                         for _ in range(eval_batches)])
    return Windows(data, tuple(per_rank[r][b] for b in range(eval_batches)
                               for r in range(world_size)), world_size)


def first_windows(data, count: int, batch_size: int) -> Windows:
    """The first `count` windows of the seed-0 order (one rank's WindowSampler), in batches
    of batch_size: mom-eval's --max-windows N and --all."""
    order = WindowSampler(len(data), seed=0)
    chosen = [next(order) for _ in range(count)]
    return Windows(data, tuple(tuple(chosen[i:i + batch_size])
                               for i in range(0, count, batch_size)))


def row_windows(rows: torch.Tensor, batch_size: int) -> Windows:
    """Rows already read (N, seq_len + 1), in order, in batches of batch_size."""
    return Windows(rows, tuple(tuple(range(i, min(i + batch_size, len(rows))))
                               for i in range(0, len(rows), batch_size)))


@dataclass(frozen=True)
class Score:
    loss: float                       # mean token cross-entropy (no balancing loss)
    ppl: float                        # exp(loss)
    windows: int
    tokens: int
    flops_per_token: Optional[float]  # forward, of the routing executed (None: no config)
    routing: Optional[RoutingRecord]  # summed over every batch and rank, on the host
    batch_losses: tuple[float, ...]   # each micro-batch's summed token loss, slot order
    measured: Optional[float] = None  # the sum of `measure` over every batch and rank

    def scalars(self, prefix: str = "eval") -> dict[str, float]:
        values = {f"{prefix}/loss": self.loss, f"{prefix}/ppl": self.ppl}
        if self.flops_per_token is not None:
            values[f"{prefix}/flops_per_token"] = self.flops_per_token
        return values


# --- the routing record: the one place evaluation touches it ---------------------------
def add_routing(total: RoutingRecord, out: Any) -> RoutingRecord:
    """`total` plus one forward's routing (a forward without one adds nothing)."""
    routing = getattr(out, "routing", None)
    return total + routing if isinstance(routing, RoutingRecord) else total


def routing_parts(total: RoutingRecord) -> list[torch.Tensor]:
    return total.tensors() if total.calls else []


def routing_summed(total: RoutingRecord, parts: list[torch.Tensor], world: int
                   ) -> Optional[RoutingRecord]:
    """The record rebuilt from its parts summed over `world` ranks."""
    return total.rank_sum(parts, world) if total.calls else None
# ----------------------------------------------------------------------------------------


def _device_of(forward) -> torch.device:
    device = getattr(forward, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(forward, torch.nn.Module):
        for p in forward.parameters():
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def score(forward: Callable[..., Any], windows: Windows, *, config=None,
          device: Optional[torch.device] = None, loss_chunk_tokens: int = 0,
          measure: Optional[Callable[[Any], torch.Tensor]] = None,
          progress: bool = False) -> Score:
    """Score `forward` (a model or the DeepSpeed engine: forward(x, labels=y) -> an output
    with .lm_loss, and .routing if it routes) on `windows`.

    With a process group of W > 1 ranks, windows.world_size must be W: each rank scores its
    own micro-batches and the result (the same on every rank) sums them all. config (a
    MoMConfig): FLOPs per token of the routing executed, forward only. measure(out): a
    scalar tensor summed over every batch and rank (Score.measured). One host read in all.
    A module is scored in eval mode and left in the mode it had."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if world > 1 and windows.world_size != world:
        raise ValueError(f"windows for {windows.world_size} rank(s) scored by {world}")
    device = device or _device_of(forward)
    step = windows.world_size if world > 1 else 1
    slots = range(rank if world > 1 else 0, len(windows.batches), step)
    sums = torch.zeros(len(windows.batches), dtype=torch.float64, device=device)
    measured = torch.zeros((), dtype=torch.float64, device=device)
    routing = RoutingRecord()
    seq_len = None
    training = getattr(forward, "training", None)
    if training:
        forward.eval()
    try:
        for n, slot in enumerate(slots):
            if progress and len(slots) > 20 and n % max(1, len(slots) // 10) == 0:
                print(f"  {n}/{len(slots)} batches", file=sys.stderr, flush=True)
            rows = windows.read(slot, device)
            x, y = rows[:, :-1], rows[:, 1:]
            seq_len = x.shape[1]
            kwargs = {"loss_chunk_tokens": loss_chunk_tokens} if loss_chunk_tokens else {}
            out = forward(x, labels=y, **kwargs)
            sums[slot] = out.lm_loss.detach().double() * y.numel()
            routing = add_routing(routing, out)
            if measure is not None:
                measured += measure(out).detach().double()
    finally:
        if training:
            forward.train()
    parts = routing_parts(routing)
    flat = torch.cat([sums, measured.reshape(1), *(t.reshape(-1).to(device) for t in parts)])
    if world > 1:
        dist.all_reduce(flat)
    flat = flat.cpu()  # the one host read
    sums_host = flat[:len(sums)].tolist()
    offset = len(sums) + 1
    pieces = []
    for t in parts:
        pieces.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    record = routing_summed(routing, pieces, world)
    if seq_len is None:  # this rank scored nothing: the length from the windows themselves
        seq_len = windows.read(0, torch.device("cpu")).shape[1] - 1
    tokens = windows.count * seq_len
    loss = math.fsum(sums_host) / tokens
    flops = None if config is None else flops_per_token(config, seq_len, record) / 3
    return Score(loss=loss, ppl=math.exp(min(loss, 50.0)), windows=windows.count,
                 tokens=tokens, flops_per_token=flops, routing=record,
                 batch_losses=tuple(sums_host),
                 measured=float(flat[len(sums)]) if measure is not None else None)
