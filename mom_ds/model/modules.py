"""The pieces every block is made of, in either block family (config.block): the norm,
rotary positions, the attention module, the FFN module, the vanilla layer, and the one
causal attention function they all call (with or without a KV cache)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoMConfig

# Rotary positions as (cos, sin), each (T, head_dim) or (B, T, head_dim): the tables of
# the tokens' positions, made once per forward (rotary_tables) and shared by every layer.
Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass
class KVEntry:
    """Cached keys/values of one (block, step): (B, heads, T, head_dim), and which keys are
    visible (B, T) when some tokens are excluded from the key set (SKIP `mask`, MoD)."""

    k: torch.Tensor
    v: torch.Tensor
    keep: Optional[torch.Tensor] = None


def rotary_tables(pos: torch.Tensor, head_dim: int, theta: float) -> Rope:
    """cos and sin of the rotation angles pos * theta^(-2i / head_dim), float32, for
    positions pos (T,) or (B, T), each angle repeated for the two halves of a head."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device,
                                            dtype=torch.float32) / head_dim)
    angles = pos.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x (B, heads, T, head_dim) rotated by its positions' angles: dimension i pairs with
    i + head_dim / 2 (the split-half layout of Llama's Hugging Face checkpoints)."""
    cos, sin = (t.to(x.dtype).unsqueeze(-3) for t in rope)  # a heads axis: (B|1, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, *,
                     n_kv_heads: Optional[int] = None, rope: Optional[Rope] = None,
                     keep: Optional[torch.Tensor] = None,
                     cache: Optional[dict] = None, cache_key: object = None,
                     dropout: float = 0.0) -> torch.Tensor:
    """Multi-head causal attention of q (B, T, d) and k, v (B, T, d * n_kv_heads / n_heads)
    -> (B, T, d); n_kv_heads < n_heads: grouped-query attention (each key/value head
    serves n_heads / n_kv_heads query heads). rope: q and k rotated by their positions.

    keep (B, T) bool removes tokens from the key set (a query always sees itself, so no row
    is empty). With a cache, earlier keys/values stored under cache_key (keys rotated) are
    prepended and the new ones appended: decoding one token at a time gives the
    full-sequence result.
    """
    B, T, d = q.shape
    hd = d // n_heads
    kv_heads = n_kv_heads or n_heads
    q = q.view(B, T, n_heads, hd).transpose(1, 2)  # (B, nh, T, hd)
    k, v = (t.view(B, T, kv_heads, hd).transpose(1, 2) for t in (k, v))
    if rope is not None:
        q, k = rotate(q, rope), rotate(k, rope)
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
        gqa = {"enable_gqa": True} if kv_heads != n_heads else {}
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, **gqa)
    else:
        if kv_heads != n_heads:  # CUDA's kernels for an explicit mask take no enable_gqa
            # (PyTorch's sdp_utils: flash refuses the mask, memory-efficient has no GQA):
            # each key/value head repeated for its query heads, the cache kept unrepeated
            k, v = (t.repeat_interleave(n_heads // kv_heads, dim=1) for t in (k, v))
        S = past + T
        qpos = torch.arange(past, S, device=q.device)[:, None]
        kpos = torch.arange(S, device=q.device)[None, :]
        mask = kpos <= qpos  # (T, S) causal with the cache offset
        if keep is not None:
            mask = mask & (keep[:, None, :] | (kpos == qpos))  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return y.transpose(1, 2).reshape(B, T, d)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 as Llama's Hugging Face code does."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, "rmsnorm", self.eps) * self.weight


def norm_kind(config: MoMConfig) -> str:
    """The block family's norm: layernorm (gpt2; its affine has a shift) or rmsnorm
    (llama; a scale only)."""
    return "rmsnorm" if config.block == "llama" else "layernorm"


def make_norm(config: MoMConfig) -> nn.Module:
    if norm_kind(config) == "rmsnorm":
        return RMSNorm(config.d_model, config.layer_norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


def normalize(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """A norm of `kind` (norm_kind) without its affine (a routed block normalises each
    token once, before its rows are gathered; each module's affine comes with its
    projection)."""
    if kind == "rmsnorm":
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def ffn_activation(y: torch.Tensor, block: str) -> torch.Tensor:
    """Between an FFN module's two projections: GPT-2's tanh GELU, or SwiGLU (the first
    projection holds gate and up side by side: silu(gate) * up)."""
    if block == "llama":
        return swiglu(*y.chunk(2, dim=-1))
    return F.gelu(y, approximate="tanh")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def fc_width(config: MoMConfig) -> int:
    """Output width of an FFN module's first projection: SwiGLU's gate and up side by side."""
    return config.ffn_width * (2 if config.block == "llama" else 1)


def sliced_linear(x: torch.Tensor, linear: nn.Linear, sizes: list[int]
                  ) -> tuple[torch.Tensor, ...]:
    """linear(x) split into `sizes` along the last dimension, as one matmul per piece on
    views of the one weight. Llama-family layers project this way: the matmuls have the
    shapes of Llama's separate q/k/v (gate/up) projections, and the backward makes each
    piece's input gradient without joining the pieces' gradients into one tensor first
    (bench/model_speed.py section 2b: 2-3% of a step on the CPU against the fused matmul)."""
    biases = linear.bias.split(sizes) if linear.bias is not None else [None] * len(sizes)
    return tuple(F.linear(x, w, b) for w, b in zip(linear.weight.split(sizes), biases))


def projection_biases(config: MoMConfig) -> tuple[bool, bool]:
    """(Q/K/V projection has a bias, every other projection has one): GPT-2 has biases
    everywhere, Llama nowhere, Qwen2 on Q/K/V only."""
    gpt2 = config.block == "gpt2"
    return gpt2 or config.qkv_bias, gpt2


def qkv_split(config: MoMConfig) -> list[int]:
    """Widths of Q, K and V inside a Q/K/V projection's output."""
    kv = config.kv_heads * config.head_dim
    return [config.d_model, kv, kv]


class AttentionModule(nn.Module):
    """Pre-norm + Q/K/V projection (d -> config.qkv_width) + output projection (d -> d).

    The attention itself (softmax over the sequence) has no parameters, so a routed block
    can sum Q/K/V from several modules and run one attention for the whole sequence.
    """

    def __init__(self, config: MoMConfig):
        super().__init__()
        d = config.d_model
        qkv_bias, bias = projection_biases(config)
        self.ln = make_norm(config)
        self.qkv = nn.Linear(d, config.qkv_width, bias=qkv_bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.split = qkv_split(config)
        self.sliced = config.block == "llama"  # GPT-2 computes its c_attn as one matmul

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q, k, v) of x."""
        if self.sliced:
            return sliced_linear(self.ln(x), self.qkv, self.split)
        return self.qkv(self.ln(x)).split(self.split, dim=-1)

    def project_out(self, a: torch.Tensor) -> torch.Tensor:
        return self.proj(a)


class FFNModule(nn.Module):
    """Pre-norm + an MLP: d -> ffn_width -> d with GPT-2's tanh GELU (gpt2), or SwiGLU's
    gate and up projections (d -> 2 * ffn_width, one matrix) and down projection (llama)."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        d, hidden = config.d_model, config.ffn_width
        self.block = config.block
        _, bias = projection_biases(config)
        self.ln = make_norm(config)
        self.fc = nn.Linear(d, fc_width(config), bias=bias)
        self.proj = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block == "llama":
            return self.proj(swiglu(*sliced_linear(self.ln(x), self.fc,
                                                   [self.proj.in_features] * 2)))
        return self.proj(ffn_activation(self.fc(self.ln(x)), self.block))


class VanillaLayer(nn.Module):
    """A transformer layer of the block family: x + attn(norm x), then x + mlp(norm x)."""

    def __init__(self, config: MoMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.kv_heads
        self.rotary = (config.head_dim, config.rope_theta) if config.block == "llama" else None
        self.attn = AttentionModule(config)
        self.ffn = FFNModule(config)
        self.dropout = config.dropout
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, *, keep: Optional[torch.Tensor] = None,
                cache: Optional[dict] = None, cache_key: object = None,
                rope: Optional[Rope] = None) -> torch.Tensor:
        """rope: the rotary tables of x's positions (block llama; MoMForCausalLM.embed makes
        them once per forward); without them, positions 0 .. T-1 (no cache: a cache's new
        tokens come after the ones it holds, which only the caller knows)."""
        if rope is None and self.rotary is not None:
            if cache is not None:
                raise ValueError("a llama-family layer with a cache needs the rotary tables "
                                 "of its tokens' positions (rope=)")
            rope = rotary_tables(torch.arange(x.shape[1], device=x.device), *self.rotary)
        q, k, v = self.attn.project_qkv(x)
        a = causal_attention(q, k, v, self.n_heads, n_kv_heads=self.n_kv_heads, rope=rope,
                             keep=keep, cache=cache, cache_key=cache_key,
                             dropout=self.dropout if self.training else 0.0)
        x = x + self.drop(self.attn.project_out(a))
        return x + self.drop(self.ffn(x))


def init_gpt2_(module: nn.Module, std: float, n_layer: int) -> None:  # either family
    """GPT-2 initialisation, for either block family: normal(std) weights, zero biases, unit
    norms, and output projections scaled by 1/sqrt(2 * n_layer) so the residual stream does
    not grow with depth."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif name.endswith(("ln.weight", "ln_weight", "ln_f.weight")):
            nn.init.ones_(p)
        elif name.endswith(("proj.weight", "proj_weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layer))
        else:
            nn.init.normal_(p, 0.0, std)
