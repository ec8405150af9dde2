"""The pieces every block is made of: attention module, FFN module, vanilla GPT-2 layer,
and the one causal attention function they all call (with or without a KV cache)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class KVEntry:
    """Cached keys/values of one (block, step): (B, heads, T, head_dim), and which keys are
    visible (B, T) when some tokens are excluded from the key set (SKIP `mask`, MoD)."""

    k: torch.Tensor
    v: torch.Tensor
    keep: Optional[torch.Tensor] = None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, *,
                     keep: Optional[torch.Tensor] = None,
                     cache: Optional[dict] = None, cache_key: object = None,
                     dropout: float = 0.0) -> torch.Tensor:
    """Multi-head causal attention of q, k, v (B, T, d) -> (B, T, d).

    keep (B, T) bool removes tokens from the key set (a query always sees itself, so no row
    is empty). With a cache, earlier keys/values stored under cache_key are prepended and the
    new ones appended: decoding one token at a time gives the full-sequence result.
    """
    B, T, d = q.shape
    hd = d // n_heads
    q, k, v = (t.view(B, T, n_heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
    past = 0
    if cache is not None:
        entry = cache.get(cache_key)
        if entry is not None:
            past = entry.k.shape[2]
            k = torch.cat([entry.k, k], dim=2)
            v = torch.cat([entry.v, v], dim=2)
            if keep is not None or entry.keep is not None:
                old = entry.keep if entry.keep is not None else \
                    torch.ones(B, past, dtype=torch.bool, device=q.device)
                new = keep if keep is not None else \
                    torch.ones(B, T, dtype=torch.bool, device=q.device)
                keep = torch.cat([old, new], dim=1)
        cache[cache_key] = KVEntry(k, v, keep)
    if keep is None and past == 0:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    else:
        S = past + T
        qpos = torch.arange(past, S, device=q.device)[:, None]
        kpos = torch.arange(S, device=q.device)[None, :]
        mask = kpos <= qpos  # (T, S) causal with the cache offset
        if keep is not None:
            mask = mask & (keep[:, None, :] | (kpos == qpos))  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return y.transpose(1, 2).reshape(B, T, d)


class AttentionModule(nn.Module):
    """Pre-LayerNorm + QKV projection (d -> 3d) + output projection (d -> d).

    The attention itself (softmax over the sequence) has no parameters, so a routed block
    can sum Q/K/V from several modules and run one attention for the whole sequence.
    """

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(self.ln(x))

    def project_out(self, a: torch.Tensor) -> torch.Tensor:
        return self.proj(a)


class FFNModule(nn.Module):
    """Pre-LayerNorm + d -> 4d -> d MLP with GPT-2's tanh GELU."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(self.ln(x)), approximate="tanh"))


class VanillaLayer(nn.Module):
    """A GPT-2 block: x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, d_model: int, n_heads: int, eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.attn = AttentionModule(d_model, eps)
        self.ffn = FFNModule(d_model, eps)
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, keep: Optional[torch.Tensor] = None,
                cache: Optional[dict] = None, cache_key: object = None) -> torch.Tensor:
        q, k, v = self.attn.project_qkv(x).split(x.shape[-1], dim=-1)
        a = causal_attention(q, k, v, self.n_heads, keep=keep, cache=cache, cache_key=cache_key,
                             dropout=self.dropout if self.training else 0.0)
        x = x + self.drop(self.attn.project_out(a))
        return x + self.drop(self.ffn(x))


def init_gpt2_(module: nn.Module, std: float, n_layer: int) -> None:
    """GPT-2 initialisation: normal(std) weights, zero biases, unit LayerNorms, and output
    projections scaled by 1/sqrt(2 * n_layer) so the residual stream does not grow with depth."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif name.endswith(("ln.weight", "ln_weight", "ln_f.weight")):
            nn.init.ones_(p)
        elif name.endswith(("proj.weight", "proj_weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layer))
        else:
            nn.init.normal_(p, 0.0, std)
