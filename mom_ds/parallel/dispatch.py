"""The dispatcher seam: carries token rows to the modules that must process them and back.

A routing decision (top-K module ids and weights per token) becomes a `RoutePlan`: the
(token, module) assignments sorted by module id, so each module sees one contiguous slice.
`LocalDispatcher` runs every module on its slice in this process. `AllToAllDispatcher`
(expert parallelism) sends each slice to the rank that owns the module, by all-to-all with
uneven splits, and brings the results back, behind the same `run` call.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .placement import ModulePlacement

ModuleFn = Callable[[torch.Tensor], torch.Tensor]
HALVES = ("attention QKV", "attention output", "FFN")


@dataclass
class RoutePlan:
    """Assignments of one half-step, sorted by module.

    token, weight: (M,) token row and routing weight of each assignment to a real module,
    in module order. sizes: rows per module (host ints, one sync when the plan is made).
    counts: (n_modules + 1,) device tensor of choices per module, last entry = SKIP.
    chosen: (N,) bool, the token chose at least one real module.
    """

    token: torch.Tensor
    weight: torch.Tensor
    sizes: list[int]
    counts: torch.Tensor
    chosen: torch.Tensor
    n_tokens: int


def make_plan(ids: torch.Tensor, weights: torch.Tensor, n_modules: int) -> RoutePlan:
    """ids, weights: (N, K); an id >= n_modules means SKIP (no module runs)."""
    N, K = ids.shape
    flat = ids.reshape(-1).clamp_max(n_modules)  # every SKIP-acting slot -> one bucket
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_modules + 1)
    # One host sync per plan (not per module): slicing needs the sizes on the host.
    sizes = counts.tolist()
    real = sum(sizes[:n_modules])
    order = order[:real]
    return RoutePlan(token=torch.div(order, K, rounding_mode="floor"),
                     weight=weights.reshape(-1)[order], sizes=sizes[:n_modules],
                     counts=counts, chosen=(ids < n_modules).any(dim=1), n_tokens=N)


def limit_capacity(plan: RoutePlan, capacity_factor: float, top_k: int) -> tuple[RoutePlan, int]:
    """Keep at most ceil(capacity_factor * N * K / n_modules) rows per module (the earliest
    tokens, in sequence order, win); returns the trimmed plan and the number dropped."""
    n = len(plan.sizes)
    cap = math.ceil(capacity_factor * plan.n_tokens * top_k / n)
    if max(plan.sizes, default=0) <= cap:
        return plan, 0
    sizes = torch.tensor(plan.sizes, device=plan.token.device)
    starts = torch.cumsum(sizes, 0) - sizes
    rank_in_module = torch.arange(plan.token.numel(), device=sizes.device) - \
        torch.repeat_interleave(starts, sizes)
    keep = rank_in_module < cap
    kept = [min(s, cap) for s in plan.sizes]
    return replace(plan, token=plan.token[keep], weight=plan.weight[keep], sizes=kept), \
        sum(plan.sizes) - sum(kept)


def _compute(fns: Sequence[ModuleFn], rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    # Every module runs, zero rows included: its grads are then 0, never None, and ZeRO-3
    # gathers its parameters on every rank alike.
    return torch.cat([fn(part) for fn, part in zip(fns, rows.split(sizes))])


def _combine(y: torch.Tensor, plan: RoutePlan, weighted: bool) -> torch.Tensor:
    if weighted:
        y = y * plan.weight.unsqueeze(1).to(y.dtype)
    return y.new_zeros(plan.n_tokens, y.shape[1]).index_add_(0, plan.token, y)


class LocalDispatcher:
    """All modules live in this process: gather, compute per contiguous slice, combine."""

    def __init__(self, capacity_factor: float = 0.0, top_k: int = 1):
        self.capacity_factor = capacity_factor
        self.top_k = top_k
        self.dropped = 0  # assignments dropped by the capacity limit since the last reset

    def _limit(self, plan: RoutePlan) -> RoutePlan:
        if self.capacity_factor <= 0:
            return plan
        plan, dropped = limit_capacity(plan, self.capacity_factor, self.top_k)
        self.dropped += dropped
        return plan

    def take_stats(self) -> tuple[int, int, float]:
        """(assignments dropped, bytes sent to other ranks, seconds exchanging) since the
        last call; the counters restart."""
        dropped, self.dropped = self.dropped, 0
        return dropped, 0, 0.0

    def run(self, x: torch.Tensor, plan: RoutePlan, fns: Sequence[ModuleFn],
            weighted: bool = True) -> torch.Tensor:
        """x: (N, d_in) -> (N, d_out) = sum over each token's assignments of
        weight * fns[module](x[token]) (plain sum when not weighted)."""
        plan = self._limit(plan)
        y = _compute(fns, x.index_select(0, plan.token), plan.sizes)
        return _combine(y, plan, weighted)


class ExpertParallelMismatch(RuntimeError):
    """Ranks of an expert-parallel group disagree about an exchange (raised, not hung)."""


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x, send_sizes, recv_sizes, group):
        ctx.sizes, ctx.group = (send_sizes, recv_sizes), group
        out = x.new_empty(sum(recv_sizes), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_sizes, recv_sizes = ctx.sizes
        out = grad.new_empty(sum(send_sizes), grad.shape[1])
        dist.all_to_all_single(out, grad.contiguous(), send_sizes, recv_sizes, group=ctx.group)
        return out, None, None, None


class AllToAllDispatcher(LocalDispatcher):
    """Modules sharded over an expert-parallel group (placement.py); each half-step:
    route at home -> exchange row counts (and a header every rank checks) -> all-to-all the
    rows -> owners compute -> all-to-all back -> weight and combine at home."""

    def __init__(self, group, block_index: int, depth: int,
                 placements: Sequence[ModulePlacement], capacity_factor: float = 0.0,
                 top_k: int = 1):
        super().__init__(capacity_factor, top_k)
        self.group = group
        self.ranks = dist.get_process_group_ranks(group)
        self.ep_rank = dist.get_rank(group)
        self.block_index = block_index
        self.depth = depth
        self.placements = {p.n_modules: p for p in placements}
        self.calls = 0
        self.bytes_sent = 0  # row bytes this rank sent to other ranks since the last reset
        self.header_bytes = 0  # bytes of the count/header exchange since the last reset
        self.timings: Optional[dict[str, float]] = None

    def _describe(self, call: int, width: int) -> str:
        per_block = 3 * self.depth
        return (f"exchange #{call} (block {self.block_index}, step {(call % per_block) // 3}, "
                f"{HALVES[call % 3]}, rows of width {width})")

    def _exchange_counts(self, sizes: list[int], placement: ModulePlacement, width: int,
                         device: torch.device) -> list[list[int]]:
        """Send each destination how many rows of each of its modules follow, with a header
        (block, call number, row width) so a rank that is out of step is named, not hung."""
        E, L = placement.ep_size, placement.per_rank
        header = [self.block_index, self.calls, width]
        table = torch.tensor([header + sizes[r * L:(r + 1) * L] for r in range(E)],
                             dtype=torch.long, device=device)
        received = torch.empty_like(table)
        dist.all_to_all_single(received, table, group=self.group)
        self.header_bytes += (E - 1) * table[0].nbytes
        rows = received.tolist()
        for src, row in enumerate(rows):
            if row[:3] != header:
                raise ExpertParallelMismatch(
                    f"expert-parallel group {self.ranks}: rank {self.ranks[self.ep_rank]} is at "
                    f"{self._describe(self.calls, width)} of block {self.block_index}, but rank "
                    f"{self.ranks[src]} sent {self._describe(row[1], row[2])} of block {row[0]}. "
                    f"Every rank must run the same config and the same forward calls in the "
                    f"same order (same depth, same number of micro-batches).")
        self.calls += 1
        return [row[3:] for row in rows]

    def take_stats(self) -> tuple[int, int, float]:
        dropped = super().take_stats()[0]
        sent, self.bytes_sent = self.bytes_sent, 0
        seconds = self.timings.pop("exchange", 0.0) if self.timings is not None else 0.0
        return dropped, sent, seconds

    def _lap(self, phase: str, t0: float) -> float:
        """Add the time since t0 to `timings[phase]` when timing is on (benchmarks, the
        monitor); forward only, wall clock (no device sync: on GPUs, time with the profiler)."""
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[phase] = self.timings.get(phase, 0.0) + now - t0
        return now

    def run(self, x: torch.Tensor, plan: RoutePlan, fns: Sequence[ModuleFn],
            weighted: bool = True) -> torch.Tensor:
        t = time.perf_counter()
        plan = self._limit(plan)
        placement = self.placements[len(plan.sizes)]
        E, L = placement.ep_size, placement.per_rank
        recv_counts = self._exchange_counts(plan.sizes, placement, x.shape[1], x.device)
        send_sizes = [sum(plan.sizes[r * L:(r + 1) * L]) for r in range(E)]
        recv_sizes = [sum(c) for c in recv_counts]
        t = self._lap("exchange", t)
        rows = x.index_select(0, plan.token)
        t = self._lap("permute", t)
        received = _AllToAll.apply(rows, send_sizes, recv_sizes, self.group)
        t = self._lap("exchange", t)
        # Received rows come source-major; regroup them module-major for one matmul each.
        flat_counts = torch.tensor([c for row in recv_counts for c in row], device=x.device)
        module_of_row = torch.repeat_interleave(
            torch.arange(L, device=x.device).repeat(E), flat_counts)
        order = torch.argsort(module_of_row, stable=True)
        per_module = [sum(recv_counts[s][m] for s in range(E)) for m in range(L)]
        regrouped = received.index_select(0, order)
        t = self._lap("permute", t)
        y = _compute(fns, regrouped, per_module)
        t = self._lap("compute", t)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=x.device)
        y = y.index_select(0, inverse)
        t = self._lap("permute", t)
        returned = _AllToAll.apply(y, recv_sizes, send_sizes, self.group)
        t = self._lap("exchange", t)
        # Row bytes that crossed to another rank, both ways (rows to oneself stay local).
        self.bytes_sent += (sum(send_sizes) - send_sizes[self.ep_rank]) * rows[0:1].nbytes + \
            (sum(recv_sizes) - recv_sizes[self.ep_rank]) * y[0:1].nbytes
        out = _combine(returned, plan, weighted)
        self._lap("combine", t)
        return out
