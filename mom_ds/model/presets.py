"""The special cases of MoM (mom-spec.md, "Special cases") as configurations.

Every preset takes the transformer's shape as keyword arguments (vocab_size, n_positions,
d_model, n_heads, dropout, ...) and returns a validated MoMConfig; `configs/presets/*.yaml`
hold the same models at GPT-2-small width.
"""
from __future__ import annotations

from typing import Any, Callable

from .config import ConfigError, MoMConfig

Shape = Any


def vanilla(n_layer: int = 12, **shape: Shape) -> MoMConfig:
    """Plain GPT-2 with n_layer layers (the fast path: no routers, no dispatch)."""
    return MoMConfig(n_bottom=n_layer, n_routed_blocks=0, **shape)


def vanilla_routed(n_layer: int = 12, **shape: Shape) -> MoMConfig:
    """GPT-2 written as MoM: one block, L + L modules, H = L, step h -> module h, no SKIP.
    Computes exactly what `vanilla(n_layer)` computes with the same weights."""
    return MoMConfig(n_routed_blocks=1, n_attn_modules=n_layer, n_ffn_modules=n_layer,
                     depth=n_layer, top_k=1, router="fixed", fixed_route="layer", use_skip=False, **shape)


def shared_layers(n_steps: int = 12, **shape: Shape) -> MoMConfig:
    """Layer sharing (Universal Transformer): one attention + one FFN module applied
    n_steps times."""
    return MoMConfig(n_routed_blocks=1, n_attn_modules=1, n_ffn_modules=1, depth=n_steps, top_k=1,
                     router="fixed", fixed_route="cycle", use_skip=False, **shape)


def moe(n_layer: int = 12, n_experts: int = 8, top_k: int = 2, router: str = "mlp",
        **shape: Shape) -> MoMConfig:
    """Mixture-of-Experts: per layer one fixed attention module and a learned top-K choice
    among n_experts FFN experts (one routed block of depth 1 per layer)."""
    return MoMConfig(n_routed_blocks=n_layer, n_attn_modules=1, n_ffn_modules=n_experts, depth=1,
                     top_k=top_k, router=router, attn_router="fixed", use_skip=False, **shape)


def early_exit(n_layer: int = 12, router: str = "gru", **shape: Shape) -> MoMConfig:
    """Early exit: step h runs layer h or SKIPs, and once a token skips it has exited."""
    return MoMConfig(n_routed_blocks=1, n_attn_modules=n_layer, n_ffn_modules=n_layer,
                     depth=n_layer, top_k=1, router=router, use_skip=True, early_exit=True, **shape)


def mixture_of_depths(n_layer: int = 12, capacity: float = 0.125, every: int = 2,
                      decode: str = "bce", **shape: Shape) -> MoMConfig:
    """Mixture-of-Depths: every `every`-th layer processes only the top capacity share of
    each sequence's tokens (mom-spec section 2)."""
    return MoMConfig(n_bottom=n_layer, n_routed_blocks=0, mod_capacity=capacity, mod_every=every,
                     mod_decode=decode, **shape)


def mom(n_routed_blocks: int = 1, n_attn_modules: int = 4, n_ffn_modules: int = 4, depth: int = 4,
        top_k: int = 1, **rest: Shape) -> MoMConfig:
    """A Mixture-of-Modules model; the remaining MoMConfig fields pass through."""
    return MoMConfig(n_routed_blocks=n_routed_blocks, n_attn_modules=n_attn_modules,
                     n_ffn_modules=n_ffn_modules, depth=depth, top_k=top_k, **rest)


PRESETS: dict[str, Callable[..., MoMConfig]] = {
    "vanilla": vanilla,
    "vanilla_routed": vanilla_routed,
    "shared_layers": shared_layers,
    "moe": moe,
    "early_exit": early_exit,
    "mod": mixture_of_depths,
    "mom": mom,
}


def preset(name: str, **kwargs: Shape) -> MoMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**kwargs)


# GPT-2 small's shape, used for the YAML files under configs/presets/.
GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, d_model=768, n_heads=12)
PRESET_ARGS: dict[str, dict[str, Any]] = {
    "vanilla": dict(n_layer=12), "vanilla_routed": dict(n_layer=12),
    "shared_layers": dict(n_steps=12), "moe": dict(n_layer=12, n_experts=8, top_k=2),
    "early_exit": dict(n_layer=12), "mod": dict(n_layer=12, capacity=0.125, every=2),
    "mom": dict(n_routed_blocks=1, n_attn_modules=4, n_ffn_modules=4, depth=4, top_k=1,
                n_bottom=1, n_top=1),
}
