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
from .modules import VanillaLayer

ROUTINGS = ("topk", "threshold")


@dataclass
class MoDRouting:
    selected: torch.Tensor  # (B, T) bool, processed tokens (detached)
    aux_loss: torch.Tensor  # BCE of the decode-time router against top-k membership


class MoDBlock(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        d = config.d_model
        self.capacity = config.mod_capacity
        self.decode = config.mod_decode
        self.layer = VanillaLayer(d, config.n_heads, config.layer_norm_eps, config.dropout)
        self.router = nn.Linear(d, 1, bias=False)
        if self.decode == "predictor":
            self.predictor = nn.Sequential(nn.Linear(d, config.router_width), nn.ReLU(),
                                           nn.Linear(config.router_width, 1))

    def capacity_tokens(self, T: int) -> int:
        return max(1, math.ceil(self.capacity * T))

    def forward(self, x: torch.Tensor, *, routing: str = "topk", cache: Optional[dict] = None,
                cache_key: object = None) -> tuple[torch.Tensor, MoDRouting]:
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
            idx = r.topk(k, dim=1).indices.sort(dim=1).values  # (B, k)
            gather = idx.unsqueeze(-1).expand(B, k, d)
            x_sel = x.gather(1, gather)
            delta = self.layer(x_sel) - x_sel
            scaled = (r.gather(1, idx).unsqueeze(-1) * delta).to(x.dtype)
            out = x.scatter_add(1, gather, scaled)
            selected = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            selected.scatter_(1, idx, True)
        else:
            selected = causal_logit > 0  # sigmoid(logit) > 0.5
            delta = self.layer(x, keep=selected, cache=cache, cache_key=cache_key) - x
            out = x + ((selected * r).unsqueeze(-1) * delta).to(x.dtype)
        aux = F.binary_cross_entropy_with_logits(causal_logit, selected.float()) \
            if routing == "topk" else r.new_zeros(())
        return out, MoDRouting(selected.detach(), aux)
