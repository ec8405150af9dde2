"""The dispatcher seam, local side: a routing decision becomes a `RoutePlan` (the (token,
module) assignments sorted by module), and `LocalDispatcher` computes every module of the
pool on its rows in this process.

Shapes are static: a plan always has N * K rows, the choices of SKIP (and, with a capacity
limit, the assignments over capacity) sorted after the last module's rows and zeroed, so a
routed step on one rank makes no device-to-host sync. Expert parallelism hands the block
another dispatcher with the same `run` (mom_ds/parallel/dispatch.py: AllToAllDispatcher).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.profiler import record_function

from .counting import count_ids
from .pools import RowGroups

# A pool's computation of one half-step: rows sorted by module -> their outputs.
ModuleFn = Callable[[torch.Tensor, RowGroups], torch.Tensor]


@dataclass
class RoutePlan:
    """The assignments of one half-step, sorted by module (all device tensors).

    token, weight: (N * K,) token row and routing weight of each sorted assignment.
    groups: which rows belong to which module (rows past its last offset: none).
    counts: (n_modules + 1,) choices per module before any capacity limit, last = SKIP;
    padding counts nowhere.
    chosen: (N,) bool, the token chose at least one real module (padding: False).
    dropped: () assignments removed by the capacity limit; None without one.
    """

    token: torch.Tensor
    weight: torch.Tensor
    groups: RowGroups
    counts: torch.Tensor
    chosen: torch.Tensor
    dropped: Optional[torch.Tensor]
    n_tokens: int


def make_plan(ids: torch.Tensor, weights: torch.Tensor, n_modules: int,
              capacity_factor: float = 0.0, real: Optional[torch.Tensor] = None,
              n_classes: Optional[int] = None) -> RoutePlan:
    """ids, weights: (N, K); an id >= n_modules means SKIP (no module runs). With
    capacity_factor > 0 each module keeps at most ceil(capacity_factor * N * K / n_modules)
    rows, the earliest tokens in sequence order (the stable sort keeps that order).

    real (N,) bool: which rows are tokens; the others (padding) go to SKIP whatever they
    chose, are counted nowhere (counts, chosen, dropped) and take no capacity slot, and N in
    the capacity counts the real rows only: the plan of a padded batch is that of its
    tokens alone.

    n_classes: how many ids the router has, when the caller knows: with at most one past
    the modules (SKIP) there is no SKIP-acting id to fold into SKIP's bucket."""
    N, K = ids.shape
    flat = ids.reshape(-1)
    if n_classes is None or n_classes > n_modules + 1:
        flat = flat.clamp_max(n_modules)  # every SKIP-acting slot -> one bucket
    real_slots = None
    if real is not None:
        real_slots = real.unsqueeze(1).expand(N, K).reshape(-1)
        flat = torch.where(real_slots, flat, n_modules)
    counts = count_ids(flat, n_modules + 1, real_slots)
    module, order = torch.sort(flat, stable=True)
    kept = counts[:n_modules]
    dropped = None
    if capacity_factor > 0:
        if real is None:
            cap = math.ceil(capacity_factor * N * K / n_modules)
        else:  # float64: the same rounding as the host's math.ceil above
            tokens = real.sum(dtype=torch.float64)
            cap = torch.ceil(capacity_factor * tokens * K / n_modules).long()
        start = torch.cumsum(counts, 0) - counts
        rank_in_module = torch.arange(len(flat), device=ids.device) - start[module]
        over = (module < n_modules) & (rank_in_module >= cap)
        module = torch.where(over, n_modules, module)
        resort = torch.argsort(module, stable=True)  # the dropped join SKIP after the kept
        order, module = order[resort], module[resort]
        kept = kept.clamp_max(cap)
        dropped = (counts[:n_modules] - kept).sum()
    # one choice per token (K = 1): the assignment index is the token's, and no `any`
    token, chosen = (order, flat < n_modules) if K == 1 else \
        (torch.div(order, K, rounding_mode="floor"), (flat.view(N, K) < n_modules).any(dim=1))
    return RoutePlan(token=token, weight=weights.reshape(-1)[order],
                     groups=RowGroups.from_sorted(module, kept), counts=counts, chosen=chosen,
                     dropped=dropped, n_tokens=N)


def combine(y: torch.Tensor, plan: RoutePlan, weighted: bool) -> torch.Tensor:
    """Sum each token's rows (times its routing weights when weighted) -> (N, d_out). Rows
    in no module are 0 (pools.grouped_linear), so they add nothing."""
    if weighted:
        y = y * plan.weight.unsqueeze(1).to(y.dtype)
    return y.new_zeros(plan.n_tokens, y.shape[1]).index_add_(0, plan.token, y)


class LocalDispatcher:
    """All modules live in this process: gather the rows, one grouped computation, combine.
    It keeps no state: what the routing did is in the block's BlockRouting."""

    def run(self, x: torch.Tensor, plan: RoutePlan, fn: ModuleFn,
            weighted: bool = True) -> torch.Tensor:
        """x: (N, d_in) -> (N, d_out) = sum over each token's assignments of
        weight * module(x[token]) (plain sum when not weighted)."""
        with record_function("permute"):
            rows = x.index_select(0, plan.token)
        with record_function("compute"):
            y = fn(rows, plan.groups)
        with record_function("combine"):
            return combine(y, plan, weighted)
