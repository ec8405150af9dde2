"""The dispatcher seam, expert-parallel side: `AllToAllDispatcher` sends each module's rows
to the rank that owns the module, by all-to-all with uneven splits, and brings the results
back, behind the same `run` call as the model's LocalDispatcher (mom_ds/model/dispatch.py).

The uneven all-to-all needs its split sizes on the host, as in torchtitan and Megatron-Core:
each exchange makes exactly one device-to-host sync (the count table below), no more.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ..model.checkpointing import recomputing
from ..model.dispatch import LocalDispatcher, ModuleFn, RoutePlan, combine
from ..model.pools import RowGroups
from .placement import ModulePlacement



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
    """One pool's modules sharded over an expert-parallel group (placement.py); each
    half-step: route at home -> exchange row counts (and a header every rank checks) ->
    all-to-all the rows -> owners compute -> all-to-all back -> weight and combine at home.
    `pool` is "attention" (two exchanges per step: QKV, output projection) or "FFN"."""

    def __init__(self, group, block_index: int, pool: str, placement: ModulePlacement):
        super().__init__()
        self.group = group
        self.ranks = dist.get_process_group_ranks(group)
        self.ep_rank = dist.get_rank(group)
        self.block_index = block_index
        self.halves = ("QKV", "output projection") if pool == "attention" else ("",)
        self.pool = pool
        self.placement = placement
        self.calls = 0
        self.bytes_sent = 0  # row bytes this rank sent to other ranks since the last reset
        self.header_bytes = 0  # bytes of the count/header exchange since the last reset
        self.timings: Optional[dict[str, float]] = None

    def _describe(self, call: int, width: int) -> str:
        n = len(self.halves)
        return (f"{self.pool} exchange #{call} (step {call // n} of a forward "
                f"{self.halves[call % n]}, rows of width {width})").replace(" )", ")")

    def _exchange_counts(self, plan: RoutePlan, placement: ModulePlacement, width: int
                         ) -> tuple[list[int], list[list[int]]]:
        """Send each destination how many rows of each of its modules follow, with a header
        (block, call number, row width) so a rank that is out of step is named, not hung.
        Returns (rows this rank sends per module, rows it receives per source and module),
        read on the host together: the exchange's one sync."""
        E, L = placement.ep_size, placement.per_rank
        ends = plan.groups.offsets.long()
        sizes = torch.diff(ends, prepend=ends.new_zeros(1))  # rows per module, on the device
        header = [self.block_index, self.calls, width]
        table = torch.cat([torch.tensor(header, device=sizes.device).expand(E, 3),
                           sizes.view(E, L)], dim=1)
        received = torch.empty_like(table)
        dist.all_to_all_single(received, table, group=self.group)
        self.header_bytes += (E - 1) * table[0].nbytes
        sent_table, rows = torch.stack([table, received]).tolist()
        for src, row in enumerate(rows):
            if row[:3] != header:
                raise ExpertParallelMismatch(
                    f"expert-parallel group {self.ranks}: rank {self.ranks[self.ep_rank]} is at "
                    f"{self._describe(self.calls, width)} of block {self.block_index}, but rank "
                    f"{self.ranks[src]} sent {self._describe(row[1], row[2])} of block {row[0]}. "
                    f"Every rank must run the same config and the same forward calls in the "
                    f"same order (same depth, same number of micro-batches).")
        self.calls += 1
        return [c for row in sent_table for c in row[3:]], [row[3:] for row in rows]

    def take_comm_stats(self) -> tuple[int, float]:
        """(row bytes sent to other ranks, seconds exchanging) since the last call; the
        counters restart. Measurements of this process's communication, kept here on the
        host; the logging step puts them in the routing record (RoutingRecord.comm,
        train/step_log.py), beside what the routing chose."""
        sent, self.bytes_sent = self.bytes_sent, 0
        seconds = self.timings.pop("exchange", 0.0) if self.timings is not None else 0.0
        return sent, seconds

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """A labelled phase of an exchange: a record_function range for the profiler and,
        when timing is on (benchmarks, the monitor), wall-clock seconds added to
        `timings[name]` (forward only, no device sync: on GPUs, time with the profiler)."""
        start = time.perf_counter()
        with record_function(name):
            yield
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def run(self, x: torch.Tensor, plan: RoutePlan, fn: ModuleFn,
            weighted: bool = True) -> torch.Tensor:
        first_run = not recomputing()  # a checkpointed step's second run counts nothing
        placement = self.placement
        E, L = placement.ep_size, placement.per_rank
        with self._phase("exchange"):
            sizes, recv_counts = self._exchange_counts(plan, placement, x.shape[1])
        send_sizes = [sum(sizes[r * L:(r + 1) * L]) for r in range(E)]
        recv_sizes = [sum(c) for c in recv_counts]
        with self._phase("permute"):
            # the plan's rows in a module are contiguous and sorted by module, so by owner too
            rows = x.index_select(0, plan.token[:sum(send_sizes)])
        with self._phase("exchange"):
            received = _AllToAll.apply(rows, send_sizes, recv_sizes, self.group)
        with self._phase("permute"):
            # Received rows come source-major; regroup them module-major for the grouped GEMM.
            flat_counts = torch.tensor([c for row in recv_counts for c in row], device=x.device)
            module_of_row = torch.repeat_interleave(
                torch.arange(L, device=x.device).repeat(E), flat_counts,
                output_size=sum(recv_sizes))
            order = torch.argsort(module_of_row, stable=True)
            per_module = [sum(recv_counts[s][m] for s in range(E)) for m in range(L)]
            regrouped = received.index_select(0, order)
        with self._phase("compute"):
            y = fn(regrouped, RowGroups.from_sorted(module_of_row[order],
                                                    torch.tensor(per_module, device=x.device),
                                                    per_module))
        with self._phase("permute"):
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=x.device)
            y = y.index_select(0, inverse)
        with self._phase("exchange"):
            returned = _AllToAll.apply(y, recv_sizes, send_sizes, self.group)
        if first_run:  # row bytes that crossed to another rank, both ways
            self.bytes_sent += (sum(send_sizes) - send_sizes[self.ep_rank]) * rows[0:1].nbytes + \
                (sum(recv_sizes) - recv_sizes[self.ep_rank]) * y[0:1].nbytes
        with self._phase("combine"):
            # the plan's rows in no module (SKIP, over capacity) come back as zeros
            padding = returned.new_zeros(len(plan.token) - len(returned), returned.shape[1])
            return combine(torch.cat([returned, padding]), plan, weighted)
