"""Mixture-of-Depths block (mom-spec.md section 2, arXiv 2404.02258).

A scalar router r_i = w . x_i scores every token. In training (`topk` routing) the top-k
tokens of each sequence (k = ceil(capacity * T)) go through a whole GPT-2 layer, among
themselves, in their original (causal) order; the rest pass on the residual. A selected
token's output is x_i + r_i * f(x_sel)_i, f = layer(x) - x: the residual is added once and
the router stays on the LM loss' gradient path.

Top-k over the sequence sees the future, so sampling routes causally (`threshold`): a token
is processed iff its router logit (`bce`) or a small predictor on stop-gradient inputs
(`predictor`) says it would be in the top-k, both trained by a BCE loss on the top-k
membership.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoMConfig
from .modules import Rope, VanillaLayer

ROUTINGS = ("topk", "threshold")


@dataclass
class MoDRouting:
    selected: torch.Tensor  # (B, T) bool, processed tokens (detached)
    mod_router_loss: torch.Tensor  # BCE of the decode-time router against top-k membership


class MoDBlock(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        d = config.d_model
        self.capacity = config.mod_capacity
        self.decode = config.mod_decode
        self.layer = VanillaLayer(config)
        self.router = nn.Linear(d, 1, bias=False)
        if self.decode == "predictor":
            self.predictor = nn.Sequential(nn.Linear(d, config.router_width), nn.ReLU(),
                                           nn.Linear(config.router_width, 1))

    def capacity_tokens(self, T: int) -> int:
        return max(1, math.ceil(self.capacity * T))

    def forward(self, x: torch.Tensor, *, routing: str = "topk",
                real: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                cache_key: object = None, rope: Optional[Rope] = None
                ) -> tuple[torch.Tensor, MoDRouting]:
        """x (B, T, d); real (B, T) bool: which positions are tokens. Padding is never
        selected, takes no capacity (a row's k counts its tokens) and is left out of the
        BCE. rope: the rotary tables of x's positions (block llama); the selected tokens
        keep their own positions."""
        if routing not in ROUTINGS:
            raise ValueError(f"MoD routing {routing!r} is not one of {ROUTINGS}")
        B, T, d = x.shape
        r = self.router(x).squeeze(-1).float()  # (B, T)
        causal_logit = self.predictor(x.detach()).squeeze(-1).float() \
            if self.decode == "predictor" else r
        if routing == "topk":
            k = self.capacity_tokens(T)
            # Gather by the chosen positions sorted ascending: the selected tokens keep
            # their causal order (not the first k tokens, not the top-k list order).
            if real is None:
                idx = r.topk(k, dim=1).indices.sort(dim=1).values  # (B, k)
                valid = None
            else:
                # Padding ranks last; of a row's k slots the first capacity_tokens(tokens)
                # are its selection, the rest (and any padding among them) are invalid:
                # no key, no output. float64: capacity_tokens' rounding.
                k_row = torch.ceil(self.capacity * real.sum(1, dtype=torch.float64))
                ranked = r.masked_fill(~real, float("-inf")).topk(k, dim=1).indices
                idx, order = ranked.sort(dim=1)
                in_capacity = torch.arange(k, device=x.device) < k_row.clamp_min(1)[:, None]
                valid = in_capacity.gather(1, order) & real.gather(1, idx)
            gather = idx.unsqueeze(-1).expand(B, k, d)
            x_sel = x.gather(1, gather)
            if rope is not None:  # each selected token's own angles: (B, k, head_dim)
                rope = tuple(t.expand(B, *t.shape[-2:]).gather(
                    1, idx.unsqueeze(-1).expand(B, k, t.shape[-1])) for t in rope)
            delta = self.layer(x_sel, keep=valid, rope=rope) - x_sel
            gate = r.gather(1, idx)
            if valid is not None:
                gate = gate * valid
            scaled = (gate.unsqueeze(-1) * delta).to(x.dtype)
            out = x.scatter_add(1, gather, scaled)
            selected = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            selected.scatter_(1, idx, True if valid is None else valid)
        else:
            selected = causal_logit > 0  # sigmoid(logit) > 0.5
            if real is not None:
                selected = selected & real
            delta = self.layer(x, keep=selected, cache=cache, cache_key=cache_key,
                               rope=rope) - x
            out = x + ((selected * r).unsqueeze(-1) * delta).to(x.dtype)
        if routing != "topk":
            bce = r.new_zeros(())
        elif real is None:
            bce = F.binary_cross_entropy_with_logits(causal_logit, selected.float())
        else:
            bce = F.binary_cross_entropy_with_logits(
                causal_logit, selected.float(), weight=real.float(), reduction="sum") \
                / real.sum().clamp_min(1)
        return out, MoDRouting(selected.detach(), bce)
