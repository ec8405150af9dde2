"""The Hugging Face architectures mom-ds imports and exports, one `Family` per block family
(config.block): which donor configs it reads, what vanilla preset a donor is, and where
each of the donor's tensors goes. hf.py does the moving, with the same tables both ways.

gpt2:  GPT2LMHeadModel.
llama: LlamaForCausalLM (Llama, SmolLM, TinyLlama), MistralForCausalLM (a Mistral whose
       sliding window never bites is a Llama), Qwen2ForCausalLM (Llama with Q/K/V biases).
transformers 4.44 to 5.x: 5.x keeps the rotary settings in `rope_parameters`, 4.x in
`rope_theta` and `rope_scaling`; both are read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel, Qwen2Config, Qwen2ForCausalLM)

from .config import ConfigError, MoMConfig


class HFInteropError(ConfigError):
    """A checkpoint, layout or model that cannot be converted; the message says the fix."""


@dataclass(frozen=True)
class LayerTensor:
    """One tensor of a MoM module and the donor tensors it is made of: `hf` names under the
    donor's layer prefix, concatenated along their first dimension (Llama's separate q, k
    and v projections are one Q/K/V projection here; gate and up are one projection), for
    the `part` (attn / ffn) of the layer, named `mom` inside the module. conv1d: the donor
    stores it (in, out), as GPT-2's Conv1D does; nn.Linear keeps (out, in)."""

    hf: tuple[str, ...]
    part: str
    mom: str
    conv1d: bool = False


@dataclass(frozen=True)
class Family:
    block: str
    model_types: tuple[str, ...]
    layer_prefix: str                                   # the donor's layer i: <prefix>.<i>.
    check: Callable[[Any], None]                        # refuse what the family cannot hold
    vanilla: Callable[[Any], MoMConfig]                 # donor config -> vanilla preset
    layer_tensors: Callable[[MoMConfig], list[LayerTensor]]
    global_tensors: Callable[[MoMConfig], list[tuple[str, str]]]  # (donor name, MoM name)
    export: Callable[[MoMConfig], PreTrainedModel]      # vanilla preset -> fresh HF model


def _refuse(config, field: str, why: str, fix: str) -> None:
    raise HFInteropError(f"the donor's {field} = {getattr(config, field, None)!r}: {why}. "
                         f"Fix: {fix}.")


# --- GPT-2 -------------------------------------------------------------------------------
# Both names compute GPT-2's tanh-approximated GELU, which FFN modules use.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# GPT-2's <|endoftext|> id, written as bos/eos when the vocabulary holds it.
_GPT2_EOT = 50256


def _gpt2_check(config) -> None:
    if config.activation_function not in _TANH_GELU:
        _refuse(config, "activation_function", "mom-ds GPT-2 FFN modules use the tanh GELU",
                "use a checkpoint trained with activation_function = 'gelu_new'")
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        _refuse(config, "scale_attn_by_inverse_layer_idx" if config.scale_attn_weights
                else "scale_attn_weights", "the checkpoint scales attention differently from "
                "GPT-2", "use a checkpoint with scale_attn_weights = True and "
                "scale_attn_by_inverse_layer_idx = False")


def _gpt2_vanilla(hf: GPT2Config) -> MoMConfig:
    # Dropout is a training choice, not a property of the weights: MoMConfig's default (0,
    # the authors' recipe) applies; pass a layout to choose otherwise.
    return MoMConfig(block="gpt2", vocab_size=hf.vocab_size, n_positions=hf.n_positions,
                     d_model=hf.n_embd, n_heads=hf.n_head, ffn_hidden=hf.n_inner or 0,
                     n_bottom=hf.n_layer, n_routed_blocks=0,
                     layer_norm_eps=hf.layer_norm_epsilon,
                     tie_word_embeddings=hf.tie_word_embeddings)


def _gpt2_layer(config: MoMConfig) -> list[LayerTensor]:
    t = LayerTensor
    return [t(("ln_1.weight",), "attn", "ln.weight"), t(("ln_1.bias",), "attn", "ln.bias"),
            t(("attn.c_attn.weight",), "attn", "qkv.weight", True),
            t(("attn.c_attn.bias",), "attn", "qkv.bias"),
            t(("attn.c_proj.weight",), "attn", "proj.weight", True),
            t(("attn.c_proj.bias",), "attn", "proj.bias"),
            t(("ln_2.weight",), "ffn", "ln.weight"), t(("ln_2.bias",), "ffn", "ln.bias"),
            t(("mlp.c_fc.weight",), "ffn", "fc.weight", True),
            t(("mlp.c_fc.bias",), "ffn", "fc.bias"),
            t(("mlp.c_proj.weight",), "ffn", "proj.weight", True),
            t(("mlp.c_proj.bias",), "ffn", "proj.bias")]


def _gpt2_global(config: MoMConfig) -> list[tuple[str, str]]:
    names = [("transformer.wte.weight", "wte.weight"), ("transformer.wpe.weight", "wpe.weight"),
             ("transformer.ln_f.weight", "ln_f.weight"), ("transformer.ln_f.bias", "ln_f.bias")]
    return names + _head(config)


def _head(config: MoMConfig) -> list[tuple[str, str]]:
    # a tied head is the embedding on both sides: no second tensor to move
    return [] if config.tie_word_embeddings else [("lm_head.weight", "lm_head.weight")]


def _gpt2_export(config: MoMConfig) -> PreTrainedModel:
    eot = _GPT2_EOT if config.vocab_size > _GPT2_EOT else None
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.d_model,
        n_layer=config.n_vanilla_layers, n_head=config.n_heads, n_inner=config.ffn_width,
        activation_function="gelu_new", resid_pdrop=config.dropout,
        embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps, initializer_range=config.init_std,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=config.tie_word_embeddings))


GPT2 = Family("gpt2", ("gpt2",), "transformer.h", _gpt2_check, _gpt2_vanilla, _gpt2_layer,
              _gpt2_global, _gpt2_export)


# --- Llama, Mistral, Qwen2 ---------------------------------------------------------------
def _rope(config) -> tuple[str, float]:
    """(rope type, theta) from 5.x's rope_parameters or 4.x's rope_scaling / rope_theta."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") \
        or "default"
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    return kind, float(theta)


def _llama_check(config) -> None:
    if config.hidden_act != "silu":
        _refuse(config, "hidden_act", "Llama-family FFN modules are SwiGLU (silu)",
                "use a checkpoint with hidden_act = 'silu'")
    kind, _ = _rope(config)
    if kind != "default":
        field = "rope_parameters" if getattr(config, "rope_parameters", None) else "rope_scaling"
        _refuse(config, field, f"rope type {kind!r} (scaled rotary positions) is not "
                "implemented; mom-ds rotates by plain theta^(-2i/d) angles",
                "use a checkpoint without rope scaling (rope_type 'default')")
    head_dim = getattr(config, "head_dim", None)
    if head_dim not in (None, config.hidden_size // config.num_attention_heads):
        _refuse(config, "head_dim", f"differs from hidden_size / num_attention_heads = "
                f"{config.hidden_size // config.num_attention_heads}",
                "use a checkpoint whose heads split hidden_size evenly")
    if getattr(config, "attention_bias", False) and config.model_type != "qwen2":
        _refuse(config, "attention_bias", "biases on every attention projection (the "
                "output one too) are not a Llama-family block mom-ds builds",
                "use a checkpoint with attention_bias = False (or Qwen2's Q/K/V biases)")
    if getattr(config, "mlp_bias", False):
        _refuse(config, "mlp_bias", "Llama-family FFN modules have no biases",
                "use a checkpoint with mlp_bias = False")
    if getattr(config, "use_sliding_window", False) or any(
            layer != "full_attention" for layer in getattr(config, "layer_types", None) or ()):
        field = "use_sliding_window" if getattr(config, "use_sliding_window", False) \
            else "layer_types"
        _refuse(config, field, "sliding-window attention is not implemented",
                "use a checkpoint whose every layer attends to the whole sequence")
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    if window is not None and window < config.max_position_embeddings:
        _refuse(config, "sliding_window", f"a window shorter than max_position_embeddings "
                f"({config.max_position_embeddings}) is not implemented",
                "use sliding_window = null, or max_position_embeddings <= sliding_window "
                "(the window then never bites)")


def _llama_vanilla(hf) -> MoMConfig:
    _, theta = _rope(hf)
    return MoMConfig(block="llama", vocab_size=hf.vocab_size,
                     n_positions=hf.max_position_embeddings, d_model=hf.hidden_size,
                     n_heads=hf.num_attention_heads,
                     n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                     ffn_hidden=hf.intermediate_size, rope_theta=theta,
                     qkv_bias=hf.model_type == "qwen2", n_bottom=hf.num_hidden_layers,
                     n_routed_blocks=0, layer_norm_eps=hf.rms_norm_eps,
                     tie_word_embeddings=hf.tie_word_embeddings)


def _llama_layer(config: MoMConfig) -> list[LayerTensor]:
    t, qkv = LayerTensor, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    tensors = [t(("input_layernorm.weight",), "attn", "ln.weight"),
               t(tuple(f"{p}.weight" for p in qkv), "attn", "qkv.weight"),
               t(("self_attn.o_proj.weight",), "attn", "proj.weight"),
               t(("post_attention_layernorm.weight",), "ffn", "ln.weight"),
               t(("mlp.gate_proj.weight", "mlp.up_proj.weight"), "ffn", "fc.weight"),
               t(("mlp.down_proj.weight",), "ffn", "proj.weight")]
    if config.qkv_bias:
        tensors.append(t(tuple(f"{p}.bias" for p in qkv), "attn", "qkv.bias"))
    return tensors


def _llama_global(config: MoMConfig) -> list[tuple[str, str]]:
    return [("model.embed_tokens.weight", "wte.weight"),
            ("model.norm.weight", "ln_f.weight")] + _head(config)


def _llama_export(config: MoMConfig) -> PreTrainedModel:
    """LlamaForCausalLM, or Qwen2ForCausalLM where the Q/K/V projections have biases."""
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if config.qkv_bias \
        else (LlamaConfig, LlamaForCausalLM)
    hf = config_class(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=config.ffn_width, num_hidden_layers=config.n_vanilla_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.n_positions, rms_norm_eps=config.layer_norm_eps,
        rope_theta=config.rope_theta, hidden_act="silu",
        # mom-ds's dropout also acts on the embeddings and residual branches, which
        # transformers' Llama has no dropout for: only the attention's carries over
        attention_dropout=config.dropout, initializer_range=config.init_std,
        tie_word_embeddings=config.tie_word_embeddings,
        # the tokenizer's ids, when to_hf is given one; not LlamaConfig's 1 and 2
        bos_token_id=None, eos_token_id=None)
    # 5.x writes theta into rope_parameters alone, where 4.x does not look (it would rotate
    # by its default 10000): written at the top level too, both read the same theta
    hf.rope_theta = config.rope_theta
    return model_class(hf)


LLAMA = Family("llama", ("llama", "mistral", "qwen2"), "model.layers", _llama_check,
               _llama_vanilla, _llama_layer, _llama_global, _llama_export)

FAMILIES = (GPT2, LLAMA)


def family_of_donor(config) -> Family:
    """The family that reads a donor config, which it has checked; one error otherwise."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            family.check(config)
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise HFInteropError(
        f"the donor's model_type = {config.model_type!r} is not an architecture mom-ds "
        f"imports (MoE donors and other blocks do not map onto its modules). Fix: pass a "
        f"checkpoint of one of: {known}.")


def family_of(config: MoMConfig) -> Family:
    return next(f for f in FAMILIES if f.block == config.block)
