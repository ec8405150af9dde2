"""The routing record: what one forward chose, or a sum of forwards (micro-batches, ranks),
in one type from the routers to FLOPs (flops.py), the monitor, TensorBoard, routing.jsonl
and mom-report.

A forward's record is `MoMOutput.routing`. The training loop sums the micro-batches of a
logging step with `+` (the one addition), the logging step sums ranks with `all_reduced`
(one collective) and copies it to the host with the step's other numbers in one transfer
(train/step_log.py); FLOPs, the dashboard and routing.jsonl read that host copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .routed_block import BlockRouting


def _empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float64)


@dataclass
class RoutingRecord:
    """blocks: each routed block's BlockRouting (choice counts, path-length histogram, balancing
    loss, dropped assignments).
    mod_selected / mod_tokens: (n_mod,) tokens each MoD block processed / saw (padding in
    neither).
    comm: (2,) expert-parallel all-to-all bytes sent and seconds exchanging, or None
    without expert parallelism; set by the logging step (train/step_log.py), since the
    dispatchers measure it on the host, not per forward.
    calls: forwards summed (0: the empty record, the zero of `+`). ranks: processes summed.
    """

    blocks: list[BlockRouting] = field(default_factory=list)
    mod_selected: torch.Tensor = field(default_factory=_empty)
    mod_tokens: torch.Tensor = field(default_factory=_empty)
    comm: Optional[torch.Tensor] = None
    calls: int = 0
    ranks: int = 1

    # --- the flat view: every sum, transfer and rebuild goes through it -----------------
    def tensors(self) -> list[torch.Tensor]:
        return [*(t for b in self.blocks for t in b.tensors()), self.mod_selected,
                self.mod_tokens, *([self.comm] if self.comm is not None else [])]

    def replaced(self, tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> "RoutingRecord":
        """The same structure holding `tensors` (in tensors() order)."""
        it = iter(tensors)
        blocks = [BlockRouting(*(next(it) for _ in b.tensors()), calls=b.calls)
                  for b in self.blocks]
        selected, tokens = next(it), next(it)
        comm = next(it) if self.comm is not None else None
        return RoutingRecord(blocks, selected, tokens, comm, self.calls, self.ranks)

    def detached(self) -> "RoutingRecord":
        """A copy to sum into: float64, no graph."""
        return self.replaced(t.detach().double() for t in self.tensors())

    def __add__(self, other: "RoutingRecord") -> "RoutingRecord":
        """The sum of two records of the same model (micro-batches, evaluation batches)."""
        if not other.calls:
            return self.detached()
        if not self.calls:
            return other.detached()
        if self.ranks != other.ranks:
            raise ValueError("cannot add a rank-summed routing record to a per-rank one")
        total = self.replaced(a + b for a, b in zip(self.detached().tensors(),
                                                    other.detached().tensors()))
        total.calls = self.calls + other.calls
        for block, a, b in zip(total.blocks, self.blocks, other.blocks):
            block.calls = a.calls + b.calls
        return total

    def all_reduced(self) -> "RoutingRecord":
        """The sum over ranks (every rank calls it at the same step): one collective."""
        if not (dist.is_available() and dist.is_initialized()) or not self.calls:
            return self
        tensors = self.tensors()
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        sizes = [t.numel() for t in tensors]
        parts = [part.view_as(t) for t, part in zip(tensors, flat.split(sizes))]
        return self.rank_sum(parts, dist.get_world_size())

    def rank_sum(self, tensors: list[torch.Tensor], world: int) -> "RoutingRecord":
        """The record holding `tensors` (in tensors() order), which are this record's summed
        over `world` ranks by a collective the caller made (all_reduced's, or one that
        carries other numbers too): its calls and ranks count them all."""
        total = self.replaced(tensors)
        total.calls, total.ranks = self.calls * world, self.ranks * world
        for block in total.blocks:
            block.calls *= world
        return total

    # --- what the readers take ---------------------------------------------------------
    def mod_shares(self) -> list[float]:
        """Share of its tokens each MoD block processed."""
        return [float(s) / max(float(n), 1.0)
                for s, n in zip(self.mod_selected.tolist(), self.mod_tokens.tolist())]

    @property
    def all_to_all_bytes(self) -> Optional[float]:
        return None if self.comm is None else float(self.comm[0])

    @property
    def all_to_all_seconds(self) -> Optional[float]:
        """Seconds exchanging, averaged over the ranks summed."""
        return None if self.comm is None else float(self.comm[1]) / self.ranks

    # --- routing.jsonl (train/monitor.py writes, cli/report.py reads) ------------------
    def as_row(self, step: int) -> dict:
        """The record's values as one JSON row (host numbers)."""
        blocks = [{name: t.detach().double().cpu().tolist() for name, t in
                   zip(BLOCK_FIELDS, b.tensors())} | {"calls": b.calls} for b in self.blocks]
        return {"step": step, "calls": self.calls, "ranks": self.ranks, "blocks": blocks,
                "mod_selected": self.mod_selected.detach().double().cpu().tolist(),
                "mod_tokens": self.mod_tokens.detach().double().cpu().tolist(),
                "comm": None if self.comm is None else self.comm.double().cpu().tolist()}

    @classmethod
    def from_row(cls, row: dict) -> "RoutingRecord":
        f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        blocks = [BlockRouting(*(f64(b[name] if name in b else b[OLD_ROW_KEYS[name]])
                                 for name in BLOCK_FIELDS), calls=b["calls"])
                  for b in row["blocks"]]
        return cls(blocks, f64(row["mod_selected"]), f64(row["mod_tokens"]),
                   None if row["comm"] is None else f64(row["comm"]), row["calls"],
                   row["ranks"])


# BlockRouting's tensors by name, in tensors() order
BLOCK_FIELDS = tuple(f.name for f in fields(BlockRouting) if f.name != "calls")
# their names in the routing.jsonl of runs written before the rename (docs/glossary.md)
OLD_ROW_KEYS = {"path_length_hist": "depth_hist", "balance_loss": "aux_loss"}
