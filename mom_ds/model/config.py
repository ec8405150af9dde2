"""MoMConfig: the typed, validated description of a Mixture-of-Modules model.

Every field is checked in `__post_init__`, so an impossible model is refused when the config
is built (from Python, YAML or the command line), before any tensor is allocated.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, Optional

import yaml

# The choices of the choice fields, which are annotated Literal[CHOICES]: --help and the
# config reference list them, a YAML or command-line value outside them is refused.
ROUTER_KINDS = ("gru", "mlp", "fixed")
FIXED_ROUTES = ("layer", "cycle")
SKIP_IN_ATTENTION = ("zero", "mask")
WEIGHTINGS = ("prob", "renorm", "logit")
MOD_DECODE = ("bce", "predictor")
BLOCKS = ("gpt2", "llama")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""
    # bad input (mom_ds/errors.py BAD_INPUT); a literal: the model package is shipped alone
    # in Hugging Face exports (hf_export.py), so it imports nothing from above it
    exit_code = 2


@dataclass
class MoMConfig:
    """A Mixture-of-Modules model of GPT-2 or Llama-family blocks (see mom-spec.md section 1
    and 2).

    Layout: n_bottom vanilla layers, n_routed_blocks routed blocks (each followed by an anchor
    vanilla layer when anchor_layers), n_top vanilla layers, then the final norm and the head.
    """

    # --- the block family ----------------------------------------------------------------
    block: Literal[BLOCKS] = "gpt2"
    """What every layer, module and pool is made of. `gpt2`: LayerNorm, learned absolute
    positions, GELU MLP, biases on every projection. `llama` (Llama, Qwen2, Mistral, SmolLM):
    RMSNorm, rotary positions, SwiGLU FFN, grouped-query attention (n_kv_heads), no biases
    but the optional Q/K/V ones (qkv_bias)."""

    # --- shape of the transformer -------------------------------------------------------
    vocab_size: int = 50257
    """Token ids the embedding holds (50257 for GPT-2's BPE)."""
    n_positions: int = 1024
    """Longest sequence (gpt2: rows of the learned position table)."""
    d_model: int = 768
    """Residual stream width."""
    n_heads: int = 12
    """Attention (query) heads; must divide d_model."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention, block llama); 0: n_heads. Must divide
    n_heads."""
    ffn_hidden: int = 0
    """Hidden width of an FFN module; 0: 4 * d_model (gpt2), 8/3 * d_model rounded up to a
    multiple of 64 (llama: SwiGLU's gate and up projections each have this width; set it
    to a checkpoint's intermediate_size to match one)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding (block llama)."""
    qkv_bias: bool = False
    """Biases on the Q, K and V projections (block llama; Qwen2 has them). gpt2 blocks have
    biases on every projection."""
    tie_word_embeddings: bool = True
    """The LM head is the token embedding (GPT-2, SmolLM); false: its own matrix (Llama,
    TinyLlama)."""

    # --- layout ------------------------------------------------------------------------
    n_bottom: int = 0
    """Vanilla GPT-2 layers before the first routed block."""
    n_routed_blocks: int = 1
    """Routed blocks; each owns its own module pool and two routers."""
    anchor_layers: bool = False
    """One fixed vanilla layer after each routed block (authors' default: on)."""
    n_top: int = 0
    """Vanilla layers after the last routed block."""

    # --- module pool and routing (per routed block) --------------------------------------
    n_attn_modules: int = 4
    """A: attention modules in each routed block's pool."""
    n_ffn_modules: int = 4
    """F: FFN modules in each routed block's pool."""
    depth: int = 4
    """H: routing steps per routed block (a token's path through it runs at most H modules
    of each kind)."""
    top_k: int = 1
    """K: modules (or SKIP) each token picks per step for attention and for FFN."""
    router: Literal[ROUTER_KINDS] = "gru"
    """Router kind for both halves: gru (state across steps), mlp (stateless), fixed (one
    module per step, weight 1, whatever top_k says)."""
    attn_router: Optional[Literal[ROUTER_KINDS]] = None
    """Override of `router` for the attention half (e.g. fixed attention in the MoE preset)."""
    ffn_router: Optional[Literal[ROUTER_KINDS]] = None
    """Override of `router` for the FFN half."""
    fixed_route: Literal[FIXED_ROUTES] = "layer"
    """Fixed routers: `layer` sends step h to module h (needs H <= pool), `cycle` to
    module h mod pool (layer sharing)."""
    router_width: int = 256
    """Hidden width of the GRU / MLP router."""
    temperature: float = 0.2
    """Softmax temperature of the router logits."""
    use_skip: bool = True
    """Add the SKIP class: a token choosing it passes on the residual."""
    skip_in_attention: Literal[SKIP_IN_ATTENTION] = "zero"
    """A SKIP-only token in attention: `zero` keeps it as a key with q=k=v=0 (authors),
    `mask` removes it from the key set."""
    weighting: Literal[WEIGHTINGS] = "prob"
    """`prob`: K=1 multiplies by the raw top-1 probability (router gets LM gradient),
    K>=2 renormalises; `renorm`: always renormalise (K=1 weight is exactly 1, authors);
    `logit`: the chosen raw router logits, no softmax, no temperature (the authors' default
    `naive` router; weights of any sign and size, so not recommended)."""
    weighted_qkv: bool = False
    """Weight the summed Q/K/V projections by the routing weights (default: plain sum)."""
    early_exit: bool = False
    """Step h may choose only module h or SKIP, and SKIP is final for the later steps."""
    capacity_factor: float = 0.0
    """0: dropless (default). Otherwise each module takes at most
    ceil(capacity_factor * tokens * K / pool) rows per half-step; overflow is dropped
    (earliest tokens win) and counted."""
    balance_loss_coef: float = 0.01
    """Coefficient of the Switch-style balancing loss added to the LM loss."""
    balance_loss_count_skip: bool = True
    """Count SKIP as a class in the balancing loss."""

    # --- Mixture-of-Depths (applies to the bottom vanilla layers) ------------------------
    mod_capacity: float = 0.0
    """Fraction of each sequence's tokens a MoD block processes; 0 turns MoD off."""
    mod_every: int = 2
    """Every mod_every-th bottom layer (the 2nd, 4th, ...) is a MoD block."""
    mod_decode: Literal[MOD_DECODE] = "bce"
    """Causal routing for sampling: `bce` (router logit > 0 trained by a BCE loss) or
    `predictor` (small MLP on stop-gradient inputs)."""
    mod_router_loss_coef: float = 0.01
    """Coefficient of the MoD BCE loss (router or predictor)."""

    # --- regularisation / numerics -------------------------------------------------------
    dropout: float = 0.0
    """Dropout on embeddings, residual branches and attention (0 in the authors' recipe)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every norm: LayerNorm (gpt2: 1e-5) or RMSNorm (llama: e.g. 1e-5 or 1e-6)."""
    init_std: float = 0.02
    """Std of the normal initialisation (GPT-2: 0.02; output projections are scaled down)."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when it is 0."""
        return self.n_kv_heads or self.n_heads

    @property
    def qkv_width(self) -> int:
        """Width of one attention module's Q, K and V projections together."""
        return (self.n_heads + 2 * self.kv_heads) * self.head_dim

    @property
    def ffn_width(self) -> int:
        """Hidden width of an FFN module (ffn_hidden, or the family's default)."""
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.block == "llama":  # 2/3 of 4d (SwiGLU's three matrices hold 8d^2 as GELU's
            # two do), rounded up to a multiple of 64 (Meta's Llama rounds to 256)
            return 64 * math.ceil(8 * self.d_model / (3 * 64))
        return 4 * self.d_model

    @property
    def n_router_classes(self) -> int:
        """Router output width: max(A, F) (+1 for SKIP); slots past a pool act as SKIP."""
        return max(self.n_attn_modules, self.n_ffn_modules) + int(self.use_skip)

    @property
    def attn_router_kind(self) -> str:
        return self.attn_router or self.router

    @property
    def ffn_router_kind(self) -> str:
        return self.ffn_router or self.router

    @property
    def n_vanilla_layers(self) -> int:
        return self.n_bottom + self.n_top + (self.n_routed_blocks if self.anchor_layers else 0)

    @property
    def n_layer_equiv(self) -> int:
        """Layers of the unrolled graph, counted in vanilla layers (used for init scaling)."""
        return max(1, self.n_vanilla_layers + self.n_routed_blocks * self.depth)

    def mod_layer_indices(self) -> list[int]:
        if self.mod_capacity <= 0:
            return []
        return [i for i in range(self.n_bottom) if (i + 1) % self.mod_every == 0]

    # ------------------------------------------------------------------------------------
    def _fail(self, name: str, why: str, fix: str) -> NoReturn:
        raise ConfigError(f"model.{name} = {getattr(self, name)!r}: {why}. Fix: {fix}.")

    def validate(self) -> None:
        fail = self._fail

        for name in ("vocab_size", "n_positions", "d_model", "n_heads", "router_width"):
            if int(getattr(self, name)) < 1:
                fail(name, "must be a positive integer", f"set model.{name} >= 1")
        for name in ("n_kv_heads", "ffn_hidden"):
            if int(getattr(self, name)) < 0:
                fail(name, "must not be negative", f"set model.{name} = 0 (the default) or more")
        for name in ("n_bottom", "n_routed_blocks", "n_top"):
            if int(getattr(self, name)) < 0:
                fail(name, "must not be negative", f"set model.{name} >= 0")
        if self.d_model % self.n_heads:
            fail("n_heads", f"does not divide d_model = {self.d_model}",
                 "choose n_heads that divides d_model (e.g. 12 heads for 768)")
        self._validate_block()
        if self.n_vanilla_layers + self.n_routed_blocks == 0:
            fail("n_routed_blocks", "the model has no layers",
                 "set n_routed_blocks >= 1 or n_bottom >= 1")
        for name, allowed in (("router", ROUTER_KINDS), ("fixed_route", FIXED_ROUTES),
                              ("skip_in_attention", SKIP_IN_ATTENTION),
                              ("weighting", WEIGHTINGS), ("mod_decode", MOD_DECODE)):
            if getattr(self, name) not in allowed:
                fail(name, f"is not one of {allowed}", f"use one of {', '.join(allowed)}")
        for name in ("attn_router", "ffn_router"):
            if getattr(self, name) is not None and getattr(self, name) not in ROUTER_KINDS:
                fail(name, f"is not one of {ROUTER_KINDS}", "use gru, mlp, fixed or leave it unset")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            fail("temperature", "must be a positive number", "use e.g. 0.2 (authors) or 1.0")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must lie in [0, 1)", "use 0.0 (default) or e.g. 0.1")
        if self.capacity_factor < 0:
            fail("capacity_factor", "must not be negative", "use 0 (dropless) or e.g. 1.25")
        if self.balance_loss_coef < 0:
            fail("balance_loss_coef", "must not be negative", "use 0.01 (Switch) or 0 to disable")
        if self.n_routed_blocks > 0:
            self._validate_routed()
        if self.mod_capacity:
            if not 0.0 < self.mod_capacity <= 1.0:
                fail("mod_capacity", "must lie in (0, 1]", "use 0.125 (MoD paper) or 0 for no MoD")
            if self.mod_every < 1:
                fail("mod_every", "must be >= 1", "use 2 (every other layer) or 1 (every layer)")
            if not self.mod_layer_indices():
                fail("mod_capacity", f"is set but no bottom layer is a MoD block "
                     f"(n_bottom = {self.n_bottom}, mod_every = {self.mod_every})",
                     "put the MoD layers in n_bottom, with n_bottom >= mod_every")

    def _validate_block(self) -> None:
        fail = self._fail

        if self.block not in BLOCKS:
            fail("block", f"is not one of {BLOCKS}", f"use one of {', '.join(BLOCKS)}")
        if self.n_heads % self.kv_heads:
            fail("n_kv_heads", f"does not divide n_heads = {self.n_heads}",
                 "use a divisor of n_heads (e.g. n_heads / 4), or 0 for one per head")
        if self.block == "gpt2":
            if self.kv_heads != self.n_heads:
                fail("n_kv_heads", "grouped-query attention needs block llama",
                     "set model.block = llama, or n_kv_heads = 0 for GPT-2 blocks")
            if self.qkv_bias:
                fail("qkv_bias", "gpt2 blocks have biases on every projection already",
                     "leave qkv_bias false with block gpt2 (it chooses Q/K/V biases for llama)")
        else:
            if self.head_dim % 2:
                fail("n_heads", f"leaves an odd head width {self.head_dim}, which rotary "
                     f"positions cannot rotate in pairs", "choose n_heads so that "
                     "d_model / n_heads is even")
            if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
                fail("rope_theta", "must be a positive number", "use 10000 (Llama 2) or "
                     "500000 (Llama 3)")

    def _validate_routed(self) -> None:
        fail = self._fail

        for name in ("n_attn_modules", "n_ffn_modules", "depth", "top_k"):
            if int(getattr(self, name)) < 1:
                fail(name, "must be >= 1 when n_routed_blocks > 0", f"set model.{name} >= 1")
        smallest = min(self.n_attn_modules, self.n_ffn_modules)
        if self.top_k > self.n_router_classes:
            fail("top_k", f"is larger than the pool plus SKIP ({self.n_router_classes} choices)",
                 f"use top_k <= {self.n_router_classes} or enlarge the pools")
        kinds = (self.attn_router_kind, self.ffn_router_kind)
        if kinds == ("fixed", "fixed") and self.top_k != 1:
            fail("top_k", "fixed routers pick exactly one module per step",
                 "use top_k = 1 with router fixed")
        for kind, pool, half in ((kinds[0], self.n_attn_modules, "attention"),
                                 (kinds[1], self.n_ffn_modules, "FFN")):
            if kind == "fixed" and self.fixed_route == "layer" and self.depth > pool:
                fail("depth", f"a fixed {half} router maps step h to module h, but the pool "
                     f"has only {pool} modules", "use depth <= pool size, or fixed_route = "
                     "cycle for layer sharing")
        if self.early_exit:
            if not self.use_skip:
                fail("early_exit", "needs the SKIP class", "set use_skip = true")
            if self.top_k != 1:
                fail("top_k", "early exit chooses module h or SKIP", "use top_k = 1")
            if self.depth > smallest:
                fail("depth", f"early exit uses module h at step h, but the pool has only "
                     f"{smallest}", "use depth <= pool size")
            if "fixed" in kinds:
                fail("router", "early exit needs a learned router", "use router gru or mlp")

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MoMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}. Fix: use only "
                              f"{sorted(known)}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MoMConfig":
        """Read the `model:` section of a recipe (or the whole file if it has none)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist. Fix: pass a path to a "
                              f"YAML file such as configs/tiny.yaml.")
        data = yaml.safe_load(path.read_text()) or {}
        return cls.from_dict(data.get("model", data))
