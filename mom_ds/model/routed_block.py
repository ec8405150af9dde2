"""One MoM routed block: a pool of attention and FFN modules assembled per token over H
routing steps (mom-spec.md section 1, "One routing step")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..parallel.dispatch import LocalDispatcher, make_plan
from .config import MoMConfig
from .modules import AttentionModule, FFNModule, causal_attention
from .routers import Router


@dataclass
class BlockRouting:
    """What one call of a routed block chose (for logs, FLOPs and tests).

    attn_counts / ffn_counts: (H, pool + 1) choices per module at each step, last = SKIP.
    depth: (N,) per token, modules-executing steps averaged over the two halves.
    aux_loss: (H,) balancing loss of attention + FFN router at each step (with grad; the
    rest is detached).
    """

    attn_counts: torch.Tensor
    ffn_counts: torch.Tensor
    depth: torch.Tensor
    aux_loss: torch.Tensor


class RoutedBlock(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.attn_modules = nn.ModuleList(AttentionModule(d, config.layer_norm_eps)
                                          for _ in range(config.n_attn_modules))
        self.ffn_modules = nn.ModuleList(FFNModule(d, config.layer_norm_eps)
                                         for _ in range(config.n_ffn_modules))
        self.attn_router = Router(config, config.attn_router_kind, config.n_attn_modules)
        self.ffn_router = Router(config, config.ffn_router_kind, config.n_ffn_modules)
        self.drop = nn.Dropout(config.dropout)
        # The seam expert parallelism replaces (parallel/expert.py: AllToAllDispatcher).
        self.dispatcher = LocalDispatcher(config.capacity_factor, config.top_k)

    def forward(self, x: torch.Tensor, *, cache: Optional[dict] = None,
                cache_key: object = None) -> tuple[torch.Tensor, BlockRouting]:
        cfg = self.config
        B, T, d = x.shape
        h = x.reshape(B * T, d)
        A, Fn = cfg.n_attn_modules, cfg.n_ffn_modules
        qkv_fns = [m.project_qkv for m in self.attn_modules]
        out_fns = [m.project_out for m in self.attn_modules]
        ffn_fns = list(self.ffn_modules)
        g_attn = g_ffn = None  # router states, reset at every block call
        exited = torch.zeros(B * T, dtype=torch.bool, device=x.device) if cfg.early_exit else None
        depth = torch.zeros(B * T, device=x.device)
        attn_counts, ffn_counts, aux = [], [], []
        for step in range(cfg.depth):
            # --- attention half: per-token Q/K/V from the chosen modules, one attention ---
            route, g_attn = self.attn_router(h, g_attn, step, exited)
            plan = make_plan(route.ids, route.weights, A)
            if exited is not None:
                exited = exited | ~plan.chosen
            qkv = self.dispatcher.run(h, plan, qkv_fns, weighted=cfg.weighted_qkv)
            q, k, v = qkv.view(B, T, 3 * d).split(d, dim=-1)
            keep = plan.chosen.view(B, T) if cfg.skip_in_attention == "mask" else None
            a = causal_attention(q, k, v, cfg.n_heads, keep=keep, cache=cache,
                                 cache_key=(cache_key, step),
                                 dropout=cfg.dropout if self.training else 0.0)
            h = h + self.drop(self.dispatcher.run(a.reshape(B * T, d), plan, out_fns))
            depth = depth + plan.chosen
            attn_counts.append(plan.counts)
            step_aux = route.aux_loss
            # --- FFN half ----------------------------------------------------------------
            route, g_ffn = self.ffn_router(h, g_ffn, step, exited)
            plan = make_plan(route.ids, route.weights, Fn)
            if exited is not None:
                exited = exited | ~plan.chosen
            h = h + self.drop(self.dispatcher.run(h, plan, ffn_fns))
            depth = depth + plan.chosen
            ffn_counts.append(plan.counts)
            aux.append(step_aux + route.aux_loss)
        routing = BlockRouting(torch.stack(attn_counts).detach(), torch.stack(ffn_counts).detach(),
                               (depth / 2).detach(), torch.stack(aux))
        return h.view(B, T, d), routing
