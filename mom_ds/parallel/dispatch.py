"""The dispatcher seam: carries token rows to the modules that must process them and back.

A routing decision (top-K module ids and weights per token) becomes a `RoutePlan`: the
(token, module) assignments sorted by module id, so each module sees one contiguous slice.
`LocalDispatcher` runs every module on its slice in this process; the expert-parallel
dispatcher (issue 5) puts an all-to-all between the gather and the module compute, and
between the module compute and the combine, behind the same `run` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

ModuleFn = Callable[[torch.Tensor], torch.Tensor]


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


class LocalDispatcher:
    """All modules live in this process: gather, compute per contiguous slice, combine."""

    def run(self, x: torch.Tensor, plan: RoutePlan, fns: Sequence[ModuleFn],
            weighted: bool = True) -> torch.Tensor:
        """x: (N, d_in) -> (N, d_out) = sum over each token's assignments of
        weight * fns[module](x[token]) (plain sum when not weighted)."""
        rows = x.index_select(0, plan.token)
        outs = [fn(part) for fn, part in zip(fns, rows.split(plan.sizes))]
        y = torch.cat(outs)  # every module runs, zero rows included: grads are 0, never None
        if weighted:
            y = y * plan.weight.unsqueeze(1).to(y.dtype)
        out = y.new_zeros(plan.n_tokens, y.shape[1])
        return out.index_add_(0, plan.token, y)
