"""One MoM routed block: a pool of attention and FFN modules assembled per token over H
routing steps (mom-spec.md section 1, "One routing step")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from .checkpointing import checkpointed
from .config import MoMConfig
from .counting import count_ids
from .dispatch import LocalDispatcher, make_plan
from .modules import Rope, causal_attention, qkv_split
from .pools import AttentionPool, FFNPool
from .routers import Router


@dataclass
class BlockRouting:
    """What a routed block chose, in one forward or summed over many (micro-batches, ranks):
    one block's part of the routing record (routing.py: RoutingRecord, which sums it).

    attn_counts / ffn_counts: (H, pool + 1) choices per module at each step, last = SKIP.
    path_length_hist: (2H + 1,) tokens per path length 0, 0.5, ... H (the modules a token
    ran through the block, attention and FFN halves counted 1/2 each).
    Padding (a forward's attention_mask) is in none of them.
    balance_loss: (H,) balancing loss of attention + FFN router at each step (with grad in a
    forward's record; a sum is detached).
    dropped: () assignments a capacity limit removed, both halves of every step.
    calls: how many forwards the record sums.
    """

    attn_counts: torch.Tensor
    ffn_counts: torch.Tensor
    path_length_hist: torch.Tensor
    balance_loss: torch.Tensor
    dropped: torch.Tensor
    calls: int = 1

    def tensors(self) -> list[torch.Tensor]:
        return [self.attn_counts, self.ffn_counts, self.path_length_hist, self.balance_loss,
                self.dropped]

    # the readers below take a host record (the logging step's copy, routing.jsonl's)
    def skip_rate(self, half: str) -> float:
        """Share of the choices of the `attn` or `ffn` half that were SKIP."""
        counts = self.attn_counts if half == "attn" else self.ffn_counts
        counts = counts.detach().double().cpu().numpy()
        return float(counts[:, -1].sum() / max(counts.sum(), 1.0))

    @property
    def mean_path_length(self) -> float:
        """Mean path length per token (0, 0.5, ... H)."""
        tokens = self.path_length_hist.detach().double().cpu().numpy()
        lengths = np.arange(len(tokens), dtype=np.float64) / 2
        return float((lengths * tokens).sum() / max(tokens.sum(), 1.0))


class RoutedBlock(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        self.config = config
        self.attn_pool = AttentionPool(config)
        self.ffn_pool = FFNPool(config)
        self.qkv_split = qkv_split(config)
        self.attn_router = Router(config, config.attn_router_kind, config.n_attn_modules)
        self.ffn_router = Router(config, config.ffn_router_kind, config.n_ffn_modules)
        self.drop = nn.Dropout(config.dropout)
        # The seams expert parallelism replaces, one per pool (mom_ds/parallel/parallelize.py)
        self.attn_dispatcher = LocalDispatcher()
        self.ffn_dispatcher = LocalDispatcher()
        # train.activation_checkpointing layer: each routing step recomputed in the backward
        self.checkpoint_steps = False

    def forward(self, x: torch.Tensor, *, real: Optional[torch.Tensor] = None,
                cache: Optional[dict] = None, cache_key: object = None,
                rope: Optional[Rope] = None) -> tuple[torch.Tensor, BlockRouting]:
        """x (B, T, d); real (B, T) bool: which positions are tokens. Padding chooses no
        module (it passes on the residual), is no key, and counts in no statistic. rope:
        the rotary tables of x's positions (block llama), applied to the summed Q and K of
        each token's modules: rotation is linear, so this equals rotating each module's
        output before the sum (tests/model/test_model_routed_reference.py checks it)."""
        cfg = self.config
        B, T, d = x.shape
        h = x.reshape(B * T, d)
        real = real.reshape(B * T) if real is not None else None
        g_attn = g_ffn = None  # router states, reset at every block call
        exited = torch.zeros(B * T, dtype=torch.bool, device=x.device) if cfg.early_exit else None
        per_step = self.checkpoint_steps and cache is None and self.training \
            and torch.is_grad_enabled()
        attn_counts, ffn_counts, balance, dropped, chosen = [], [], [], [], []
        for step in range(cfg.depth):
            args = (h, g_attn, g_ffn, exited, real, step, (B, T), cache, cache_key, rope)
            h, g_attn, g_ffn, exited, plan_a, plan_f, step_balance = \
                checkpointed(self._step, *args) if per_step else self._step(*args)
            attn_counts.append(plan_a.counts)
            ffn_counts.append(plan_f.counts)
            balance.append(step_balance)
            dropped += [plan.dropped for plan in (plan_a, plan_f) if plan.dropped is not None]
            chosen += [plan_a.chosen, plan_f.chosen]
        # the halves each token executed, summed once here rather than carried step by step
        halves = torch.stack(chosen).sum(dim=0)
        path_length_hist = count_ids(halves, 2 * cfg.depth + 1, real)
        dropped = torch.stack(dropped).sum() if dropped else \
            torch.zeros((), dtype=torch.long, device=x.device)  # no capacity limit
        routing = BlockRouting(torch.stack(attn_counts), torch.stack(ffn_counts),
                               path_length_hist, torch.stack(balance), dropped)
        return h.view(B, T, d), routing

    def _step(self, h: torch.Tensor, g_attn: Optional[torch.Tensor],
              g_ffn: Optional[torch.Tensor], exited: Optional[torch.Tensor],
              real: Optional[torch.Tensor], step: int, shape: tuple[int, int],
              cache: Optional[dict], cache_key: object, rope: Optional[Rope]) -> tuple:
        """One routing step: the attention half, then the FFN half. Returns the new
        (h, router states, exited), the two halves' plans (their counts, chosen tokens and
        assignments dropped by the capacity limit) and the step's balancing loss."""
        cfg = self.config
        B, T = shape
        A, Fn, cap = cfg.n_attn_modules, cfg.n_ffn_modules, cfg.capacity_factor
        attn, ffn = self.attn_pool, self.ffn_pool
        # --- attention half: per-token Q/K/V from the chosen modules, one attention ---
        with record_function("route"):
            route, g_attn = self.attn_router(h, g_attn, step, exited, real)
            plan_a = make_plan(route.ids, route.weights, A, cap, real,
                               self.attn_router.n_classes)
            step_balance = self.attn_router.balancing_loss(route, plan_a.counts, real)
        if exited is not None:
            exited = exited | ~plan_a.chosen
        qkv = self.attn_dispatcher.run(attn.normalize(h), plan_a, attn.qkv,
                                       weighted=cfg.weighted_qkv)
        q, k, v = qkv.view(B, T, -1).split(self.qkv_split, dim=-1)
        # `mask`: a token that chose no module is no key (padding never chooses one);
        # `zero`: it stays a key, padding does not
        keep = plan_a.chosen if cfg.skip_in_attention == "mask" else real
        keep = keep.view(B, T) if keep is not None else None
        with record_function("attention"):
            a = causal_attention(q, k, v, cfg.n_heads, n_kv_heads=cfg.kv_heads, rope=rope,
                                 keep=keep, cache=cache, cache_key=(cache_key, step),
                                 dropout=cfg.dropout if self.training else 0.0)
        h = h + self.drop(self.attn_dispatcher.run(a.reshape(B * T, -1), plan_a, attn.proj))
        # --- FFN half ----------------------------------------------------------------
        with record_function("route"):
            route, g_ffn = self.ffn_router(h, g_ffn, step, exited, real)
            plan_f = make_plan(route.ids, route.weights, Fn, cap, real,
                               self.ffn_router.n_classes)
            step_balance = step_balance + self.ffn_router.balancing_loss(route, plan_f.counts, real)
        if exited is not None:
            exited = exited | ~plan_f.chosen
        h = h + self.drop(self.ffn_dispatcher.run(ffn.normalize(h), plan_f, ffn))
        return h, g_attn, g_ffn, exited, plan_a, plan_f, step_balance
