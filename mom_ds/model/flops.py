"""Training FLOPs per token (forward + backward) from the routing actually taken.

nanoGPT's convention (PaLM appendix B): 6 FLOPs per executed parameter per token plus
12 * d * T per attention computation (QK^T and AV, forward and backward, whatever the
number of key/value heads), with the position table left out and the head counted once
(an untied head's matrix; its input embedding is a lookup, like the position table). For
the vanilla preset this is exactly 6N + 12*L*H*Q*T; for MoM the parameters are the modules
a token actually ran. The modules' shapes are the block family's (modules.py): SwiGLU has
three matrices, grouped-query attention smaller K and V projections.
"""
from __future__ import annotations

from typing import Optional

from .config import MoMConfig
from .modules import fc_width, norm_kind, projection_biases
from .routing import RoutingRecord


def _norm_params(config: MoMConfig) -> int:
    return config.d_model * (2 if norm_kind(config) == "layernorm" else 1)  # + its shift


def attention_module_params(config: MoMConfig) -> int:
    d, qkv = config.d_model, config.qkv_width
    qkv_bias, bias = projection_biases(config)
    return _norm_params(config) + d * qkv + qkv * qkv_bias + d * d + d * bias


def ffn_module_params(config: MoMConfig) -> int:
    d, hidden, fc = config.d_model, config.ffn_width, fc_width(config)
    _, bias = projection_biases(config)
    return _norm_params(config) + d * fc + fc * bias + hidden * d + d * bias


def layer_params(config: MoMConfig) -> int:
    """One vanilla layer: an attention module and an FFN module."""
    return attention_module_params(config) + ffn_module_params(config)


def head_params(config: MoMConfig) -> int:
    """The final norm and the head's matrix (counted once, tied or not)."""
    return config.vocab_size * config.d_model + _norm_params(config)


def router_params(config: MoMConfig, kind: str) -> int:
    d, r, c = config.d_model, config.router_width, config.n_router_classes
    head = r * c + c
    if kind == "gru":
        return 3 * (d * r + r) + 3 * (r * r + r) + head
    if kind == "mlp":
        return d * r + r + head
    return 0


def mod_router_params(config: MoMConfig) -> int:
    d, r = config.d_model, config.router_width
    return d + ((d * r + r) + (r + 1) if config.mod_decode == "predictor" else 0)


def flops_per_token(config: MoMConfig, seq_len: int,
                    routing: Optional[RoutingRecord] = None) -> float:
    """FLOPs to train on one token of a seq_len-token window.

    routing: what forward passes chose (MoMOutput.routing, or a sum of them over
    micro-batches and ranks: the shares are of all the tokens it counts). Without it (or
    with the empty record), every routed step runs K modules per learned half and one per
    fixed half (no SKIP), and every MoD block processes its capacity share: the planned
    cost.
    """
    if routing is not None and not routing.calls:
        routing = None
    d, T = config.d_model, seq_len
    layer = layer_params(config)
    params = head_params(config)
    attentions = 0.0
    mod_layers = config.mod_layer_indices()
    plain = config.n_vanilla_layers - len(mod_layers)
    params += plain * layer
    attentions += plain
    taken = routing.mod_shares() if routing is not None else None
    for i in range(len(mod_layers)):
        share = taken[i] if taken is not None \
            else min(1.0, max(1, round(config.mod_capacity * T)) / T)
        params += share * layer + mod_router_params(config)
        attentions += share * share  # the selected share of tokens attends over that share
    k_attn = choices_per_step(config, config.attn_router_kind)
    k_ffn = choices_per_step(config, config.ffn_router_kind)
    per_block = []
    for c in range(config.n_routed_blocks):
        if routing is not None:
            block = routing.blocks[c]
            attn = _modules_per_token(block.attn_counts, config.n_attn_modules, k_attn)
            ffn = _modules_per_token(block.ffn_counts, config.n_ffn_modules, k_ffn)
        else:
            attn, ffn = [float(k_attn)] * config.depth, [float(k_ffn)] * config.depth
        per_block.append(sum(attn) * attention_module_params(config)
                         + sum(ffn) * ffn_module_params(config))
    routers = config.depth * (router_params(config, config.attn_router_kind)
                              + router_params(config, config.ffn_router_kind))
    params += sum(per_block) + config.n_routed_blocks * routers
    attentions += config.n_routed_blocks * config.depth
    return 6.0 * params + 12.0 * attentions * d * T


def choices_per_step(config: MoMConfig, router_kind: str) -> int:
    """Modules a token is sent to at one routing step: a fixed router names exactly one (the
    MoE preset's attention half), a learned router its top K."""
    return 1 if router_kind == "fixed" else config.top_k


def _modules_per_token(counts, pool: int, choices: int) -> list[float]:
    """counts (H, pool + 1): choices per module at each step (last = SKIP); each token made
    `choices` choices, so tokens = row sum / choices."""
    counts = counts.double()
    tokens = counts.sum(dim=1) / choices
    return (counts[:, :pool].sum(dim=1) / tokens).tolist()
