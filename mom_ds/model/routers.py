"""Routers: GRU (state carried across the H steps), MLP (stateless) and fixed; top-K choice,
routing weights and the Switch-style balancing loss. All router math runs in fp32."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoMConfig
from .counting import count_ids


@dataclass
class RouteDecision:
    ids: torch.Tensor      # (N, K) chosen classes; id >= pool size means SKIP
    weights: torch.Tensor  # (N, K) routing weights (fp32)
    probs: Optional[torch.Tensor]  # (N, classes) softmax of the logits (None: fixed router)


def _f32(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if p is None else p.float()


class Router(nn.Module):
    """Scores the router classes for every token at one step of a routed block.

    Classes 0..pool-1 are modules; the others (the SKIP class, and slots past a pool that
    is smaller than the router width) act as SKIP.
    """

    def __init__(self, config: MoMConfig, kind: str, pool_size: int):
        super().__init__()
        self.kind = kind
        self.pool_size = pool_size
        self.n_classes = config.n_router_classes
        self.top_k = config.top_k
        self.temperature = config.temperature
        self.weighting = config.weighting
        self.fixed_cycle = config.fixed_route == "cycle"
        self.early_exit = config.early_exit
        self.count_skip = config.balance_loss_count_skip
        # parallelize() hands in a (differentiable) mean over the data-parallel group, so the
        # balancing loss sees the global batch's statistics whatever the number of ranks.
        self.stat_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        d, r = config.d_model, config.router_width
        if kind == "gru":
            # nn.GRUCell holds the parameters; the gate math is written out in `_gru` so it
            # runs in fp32 whatever dtype the engine stores the weights in.
            self.cell = nn.GRUCell(d, r)
            self.head = nn.Linear(r, self.n_classes)
        elif kind == "mlp":
            self.hidden = nn.Linear(d, r)
            self.head = nn.Linear(r, self.n_classes)

    @property
    def learned(self) -> bool:
        return self.kind != "fixed"

    def _gru(self, x: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.cell
        gi = F.linear(x, c.weight_ih.float(), _f32(c.bias_ih))
        if g is None:  # state reset to 0 at the block's start: W_hh g vanishes
            g = x.new_zeros(x.shape[0], c.hidden_size)
        gh = F.linear(g, c.weight_hh.float(), _f32(c.bias_hh))
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (g - n)

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor], step: int,
                exited: Optional[torch.Tensor] = None, real: Optional[torch.Tensor] = None
                ) -> tuple[RouteDecision, Optional[torch.Tensor]]:
        """x: (N, d) residual stream (no LayerNorm); real (N,) bool: which rows are tokens
        (the balancing loss leaves padding out; make_plan sends it to SKIP). Returns the
        decision and the new state."""
        N = x.shape[0]
        if not self.learned:
            module = step % self.pool_size if self.fixed_cycle else step
            ids = torch.full((N, 1), module, dtype=torch.long, device=x.device)
            ones = torch.ones(N, 1, dtype=torch.float32, device=x.device)
            return RouteDecision(ids, ones, None), None
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            if self.kind == "gru":
                state = self._gru(xf, state)
                hidden = state
            else:
                hidden = F.relu(F.linear(xf, self.hidden.weight.float(), _f32(self.hidden.bias)))
            logits = F.linear(hidden, self.head.weight.float(), _f32(self.head.bias))
            if self.early_exit:  # step h may choose module h or SKIP (the last class) only
                allowed = torch.zeros(self.n_classes, dtype=torch.bool, device=x.device)
                allowed[step] = True
                allowed[-1] = True
                logits = logits.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(logits / self.temperature, dim=-1)
            top_p, ids = probs.topk(self.top_k, dim=-1)
            if self.weighting == "logit":  # softmax is monotonic: the same ids as top_p's
                weights = logits.gather(1, ids)
            elif self.top_k > 1 or self.weighting == "renorm":
                weights = top_p / top_p.sum(dim=-1, keepdim=True)
            else:
                weights = top_p
            if exited is not None:  # early exit: SKIP is final
                ids = torch.where(exited.unsqueeze(1), torch.full_like(ids, self.n_classes - 1), ids)
        return RouteDecision(ids, weights, probs), state

    def balancing_loss(self, route: RouteDecision, plan_counts: torch.Tensor,
                       real: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Switch: N_cls * sum_e f_e * P_e, f_e = share of tokens whose top-1 is e,
        P_e = mean probability of e. SKIP-acting classes optionally left out. With `real`
        (N,) bool the shares and means are over the real tokens only. plan_counts: the
        choices per module of this decision's plan (dispatch.make_plan), SKIP last: with one
        choice per token they are the top-1 counts wherever the SKIP-acting classes are one
        class or not counted, and counting again would cost a routing step four ops."""
        if route.probs is None:  # a fixed router has nothing to balance
            return plan_counts.new_zeros((), dtype=torch.float32)
        probs, n = route.probs, (self.n_classes if self.count_skip else self.pool_size)
        if route.ids.shape[1] == 1 and n <= len(plan_counts):
            chosen = plan_counts
        else:
            chosen = count_ids(route.ids[:, 0], self.n_classes, real)
        if n < len(chosen):
            chosen = chosen[:n]
        if n < probs.shape[1]:
            probs = probs[:, :n]
        if real is None:
            f = chosen.float() / probs.shape[0]
            P = probs.mean(dim=0)
            if self.stat_mean is not None:
                f, P = self.stat_mean(f), self.stat_mean(P)
            return n * (f * P).sum()
        # Sums and the token count are averaged over ranks separately, then divided: the
        # global batch's shares even where ranks hold different amounts of padding.
        chosen = chosen.float()
        mass = (probs * real.unsqueeze(1)).sum(dim=0)
        tokens = real.sum().float()
        if self.stat_mean is not None:
            chosen, mass, tokens = (self.stat_mean(t) for t in (chosen, mass, tokens))
        tokens = tokens.clamp_min(1)  # a batch of padding alone: no loss, not NaN
        return n * (chosen / tokens * (mass / tokens)).sum()
