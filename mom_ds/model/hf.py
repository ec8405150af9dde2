"""Hugging Face GPT-2 interop.

`from_hf_gpt2` turns a GPT2LMHeadModel into a vanilla preset with the same outputs, or, given
a MoM layout, cuts it into modules by the two-stage layer map of mom-spec.md section 1.
`gpt2_lm_head` turns a vanilla preset back into a GPT2LMHeadModel (hf_export.py writes it,
and every other model as remote code).

Both directions are driven by one table, `tensor_map`, so what is imported is exactly what
is exported.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from data_prep.hub import cache_only, offline_note

from .config import ConfigError, MoMConfig
from .model import MoMForCausalLM


class HFInteropError(ConfigError):
    """A checkpoint, layout or model that cannot be converted; the message says the fix."""


# Tensors of one donor layer: (name under transformer.h.<i>, part of the layer, name inside
# the MoM module that receives that part, stored as HF Conv1D). Conv1D keeps its weight as
# (in, out), nn.Linear as (out, in), hence the transpose flag.
_LAYER_TENSORS = (
    ("ln_1.weight", "attn", "ln.weight", False),
    ("ln_1.bias", "attn", "ln.bias", False),
    ("attn.c_attn.weight", "attn", "qkv.weight", True),
    ("attn.c_attn.bias", "attn", "qkv.bias", False),
    ("attn.c_proj.weight", "attn", "proj.weight", True),
    ("attn.c_proj.bias", "attn", "proj.bias", False),
    ("ln_2.weight", "ffn", "ln.weight", False),
    ("ln_2.bias", "ffn", "ln.bias", False),
    ("mlp.c_fc.weight", "ffn", "fc.weight", True),
    ("mlp.c_fc.bias", "ffn", "fc.bias", False),
    ("mlp.c_proj.weight", "ffn", "proj.weight", True),
    ("mlp.c_proj.bias", "ffn", "proj.bias", False),
)
# Outside the layers. lm_head is tied to wte on both sides, so it is not listed.
_GLOBAL_TENSORS = (
    ("transformer.wte.weight", "wte.weight"),
    ("transformer.wpe.weight", "wpe.weight"),
    ("transformer.ln_f.weight", "ln_f.weight"),
    ("transformer.ln_f.bias", "ln_f.bias"),
)
# Both names compute GPT-2's tanh-approximated GELU, which FFNModule uses.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# The weight files read (sharded or not); pytorch_model.bin is a pickle and is never read.
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
# GPT-2's <|endoftext|> id, written as bos/eos when the vocabulary holds it.
_GPT2_EOT = 50256


class LayerTarget(NamedTuple):
    """Where one donor layer goes: the module paths (in MoMForCausalLM) receiving its
    attention part and its MLP part; None drops that part (a pool smaller than max(A, F))."""

    attn: Optional[str]
    ffn: Optional[str]


def _vanilla_target(path: str) -> LayerTarget:
    return LayerTarget(f"{path}.attn", f"{path}.ffn")


def required_donor_layers(layout: MoMConfig) -> int:
    """Donor layers the two-stage map consumes: n_bottom + n_routed_blocks * (max(A, F) + anchor)
    + n_top."""
    per_block = max(layout.n_attn_modules, layout.n_ffn_modules) + int(layout.anchor_layers)
    return layout.n_bottom + layout.n_routed_blocks * per_block + layout.n_top


def _check_layer_count(donor_layers: int, layout: MoMConfig) -> None:
    need = required_donor_layers(layout)
    if donor_layers == need:
        return
    terms = [f"n_bottom ({layout.n_bottom})"]
    if layout.n_routed_blocks:  # pool sizes and anchors only count when there are routed blocks
        width = max(layout.n_attn_modules, layout.n_ffn_modules)
        terms.append(f"n_routed_blocks ({layout.n_routed_blocks}) * (max(A, F) ({width}) + anchor "
                     f"({int(layout.anchor_layers)}))")
    terms.append(f"n_top ({layout.n_top})")
    spare = donor_layers - (need - layout.n_top)
    hint = f"e.g. n_top = {spare}" if spare >= 0 else "e.g. fewer bottom layers or routed blocks"
    raise HFInteropError(
        f"the donor has {donor_layers} layers but the layout consumes {' + '.join(terms)} = "
        f"{need}. Fix: choose the layout so that this sum is {donor_layers} ({hint}).")


def two_stage_layer_map(donor_layers: int, layout: MoMConfig) -> list[tuple[int, LayerTarget]]:
    """The two-stage initialisation map of mom-spec section 1, as (donor layer, target).

    The first n_bottom layers become the bottom layers; each routed block takes the next
    max(A, F) layers as its modules (attention part of layer j -> attention module j if j < A, MLP
    part -> FFN module j if j < F), then one layer as its anchor; the rest become the top
    layers. A vanilla layout (n_routed_blocks = 0) is the identity map onto bottom + top.
    """
    _check_layer_count(donor_layers, layout)
    mod_layers = set(layout.mod_layer_indices())
    # A MoD bottom block wraps its GPT-2 layer in `.layer` beside its fresh router.
    targets = [_vanilla_target(f"bottom.{i}.layer" if i in mod_layers else f"bottom.{i}")
               for i in range(layout.n_bottom)]
    A, F = layout.n_attn_modules, layout.n_ffn_modules
    for c in range(layout.n_routed_blocks):
        targets += [LayerTarget(f"chunks.{c}.attn_modules.{j}" if j < A else None,
                                f"chunks.{c}.ffn_modules.{j}" if j < F else None)
                    for j in range(max(A, F))]
        if layout.anchor_layers:
            targets.append(_vanilla_target(f"anchors.{c}"))
    targets += [_vanilla_target(f"top.{i}") for i in range(layout.n_top)]
    return list(enumerate(targets))


def tensor_map(donor_layers: int, layout: MoMConfig) -> list[tuple[str, str, bool]]:
    """(HF tensor name, MoM parameter name, transposed) for every tensor the map places."""
    pairs = [(hf, mom, False) for hf, mom in _GLOBAL_TENSORS]
    for layer, target in two_stage_layer_map(donor_layers, layout):
        for hf_name, part, mom_name, conv1d in _LAYER_TENSORS:
            module = getattr(target, part)
            if module is not None:
                pairs.append((f"transformer.h.{layer}.{hf_name}", f"{module}.{mom_name}", conv1d))
    return pairs


def _transfer(pairs: list[tuple[str, str, bool]], source: dict[str, torch.Tensor],
              dest: dict[str, torch.Tensor]) -> None:
    """Copy source[s] (transposed where flagged) into dest[d] for every (s, d, flag), after
    checking its shape, so a bad checkpoint names its tensor instead of failing in copy_."""
    with torch.no_grad():
        for src_name, dst_name, transpose in pairs:
            if src_name not in source:
                raise HFInteropError(f"the checkpoint has no tensor {src_name}. Fix: pass a "
                                     f"complete GPT2LMHeadModel checkpoint.")
            value = source[src_name]
            want = dest[dst_name].shape
            want = want[::-1] if transpose else want
            if value.shape != want:
                raise HFInteropError(
                    f"{src_name} has shape {tuple(value.shape)} but {tuple(want)} is expected "
                    f"for {dst_name}. Fix: use a checkpoint whose config matches its weights "
                    f"(GPT-2 with n_inner = 4 * n_embd).")
            dest[dst_name].copy_(value.t() if transpose else value)


# --- import ------------------------------------------------------------------------------
def _check_donor_config(config) -> None:
    if config.model_type != "gpt2":
        raise HFInteropError(
            f"the checkpoint is a {config.model_type!r} model, not GPT-2. Fix: pass a GPT-2 "
            f"checkpoint (config.model_type 'gpt2', a GPT2LMHeadModel); mom-ds modules are "
            f"GPT-2 blocks and other architectures do not map onto them.")
    if config.activation_function not in _TANH_GELU:
        raise HFInteropError(
            f"the checkpoint uses activation_function = {config.activation_function!r}, but "
            f"mom-ds FFN modules use GPT-2's tanh GELU. Fix: use a checkpoint trained with "
            f"activation_function = 'gelu_new'.")
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        raise HFInteropError(
            "the checkpoint scales attention differently from GPT-2 (scale_attn_weights = "
            f"{config.scale_attn_weights}, scale_attn_by_inverse_layer_idx = "
            f"{config.scale_attn_by_inverse_layer_idx}). Fix: use a checkpoint with "
            "scale_attn_weights = True and scale_attn_by_inverse_layer_idx = False.")


def _from_pretrained(loader, path: Union[str, Path]):
    """`loader.from_pretrained(path)`; a hub name comes from the cache alone when the hub
    cannot be reached (data_prep/hub.py), and a miss is one error naming the name."""
    weights = loader is not AutoConfig
    options = {"use_safetensors": True} if weights else {}  # never a pickled .bin
    if Path(path).exists():
        if weights and not any((Path(path) / w).is_file() for w in _SAFETENSORS):
            raise HFInteropError(f"{path} holds no model.safetensors. mom-ds reads no pickled "
                                 f"weights (pytorch_model.bin can run code when loaded). Fix: "
                                 f"save the model with save_pretrained(DIR) (safetensors is "
                                 f"its default).")
        return loader.from_pretrained(path, **options)
    try:
        return loader.from_pretrained(path, local_files_only=cache_only(), **options)
    except OSError as err:
        raise HFInteropError(f"{path} is neither a directory nor a Hugging Face model the cache or "
                             f"the hub could provide ({type(err).__name__}{offline_note()}). Fix: "
                             f"pass a directory written by save_pretrained, or a hub name with "
                             f"the network (or the model in the cache).") from err


def _load_donor(path_or_model: Union[str, Path, PreTrainedModel]) -> GPT2LMHeadModel:
    if isinstance(path_or_model, PreTrainedModel):
        _check_donor_config(path_or_model.config)
        model = path_or_model
    else:
        # Read the config first: refuse a foreign checkpoint before loading its weights.
        _check_donor_config(_from_pretrained(AutoConfig, path_or_model))
        model = _from_pretrained(GPT2LMHeadModel, path_or_model)
    if not isinstance(model, GPT2LMHeadModel):
        raise HFInteropError(f"got a {type(model).__name__}, which has no LM head. Fix: pass "
                             f"a GPT2LMHeadModel (or its directory / hub name).")
    return model


def _vanilla_layout(hf: GPT2Config) -> MoMConfig:
    # Dropout is a training choice, not a property of the weights: MoMConfig's default (0,
    # the authors' recipe) applies; pass a layout to choose otherwise.
    return MoMConfig(vocab_size=hf.vocab_size, n_positions=hf.n_positions, d_model=hf.n_embd,
                     n_heads=hf.n_head, n_bottom=hf.n_layer, n_routed_blocks=0,
                     layer_norm_eps=hf.layer_norm_epsilon)


def gpt2_vanilla_config(path: Union[str, Path]) -> MoMConfig:
    """The vanilla preset a GPT-2 checkpoint (directory or hub name) imports as, read from
    its config alone (no weights loaded)."""
    hf = _from_pretrained(AutoConfig, path)
    _check_donor_config(hf)
    return _vanilla_layout(hf)


def _check_layout_shape(hf: GPT2Config, layout: MoMConfig) -> None:
    for field, hf_field in (("d_model", "n_embd"), ("n_heads", "n_head"),
                            ("vocab_size", "vocab_size"), ("n_positions", "n_positions"),
                            ("layer_norm_eps", "layer_norm_epsilon")):
        donor = getattr(hf, hf_field)
        if getattr(layout, field) != donor:
            raise HFInteropError(
                f"layout model.{field} = {getattr(layout, field)!r} but the GPT-2 donor has "
                f"{hf_field} = {donor!r}. Fix: set model.{field} = {donor!r}; the donor fixes "
                f"the shape, the layout only chooses how its layers are arranged.")


def _check_tied_head(state: dict[str, torch.Tensor]) -> None:
    # MoMForCausalLM's head is wte itself; an untied donor head would be silently lost.
    head = state.get("lm_head.weight")
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise HFInteropError("the checkpoint's lm_head differs from its token embedding "
                             "(untied head), but mom-ds ties the head to wte. Fix: use a "
                             "GPT-2 checkpoint with tie_word_embeddings = True.")


def from_hf_gpt2(path_or_model: Union[str, Path, PreTrainedModel],
                 layout: Optional[MoMConfig] = None) -> MoMForCausalLM:
    """A MoMForCausalLM initialised from a GPT-2 checkpoint (directory, hub name, or model).

    Without layout: the vanilla preset (n_bottom = n_layer, n_routed_blocks = 0) with the same
    outputs. With layout: the two-stage map (`two_stage_layer_map`); embeddings and ln_f are
    copied, routers (and MoD routers) keep the model's fresh initialisation.
    """
    donor = _load_donor(path_or_model)
    hf = donor.config
    layout = layout if layout is not None else _vanilla_layout(hf)
    _check_layout_shape(hf, layout)
    pairs = tensor_map(hf.n_layer, layout)  # checks the layer count before allocating
    state = donor.state_dict()
    _check_tied_head(state)
    model = MoMForCausalLM(layout)
    _transfer(pairs, state, model.per_module_tensors())
    return model


# --- export ------------------------------------------------------------------------------
def is_gpt2_shaped(config: MoMConfig) -> bool:
    """A vanilla preset: no routed block, no MoD block (what GPT2LMHeadModel can hold)."""
    return not (config.n_routed_blocks or config.mod_layer_indices())


def _check_exportable(config: MoMConfig) -> None:
    if not is_gpt2_shaped(config):
        raise HFInteropError(
            f"GPT2LMHeadModel holds a vanilla preset only, but this model has "
            f"{config.n_routed_blocks} routed block(s) and {len(config.mod_layer_indices())} MoD "
            f"block(s). Fix: export it with hf_export.to_hf (remote code), or use a model "
            f"with n_routed_blocks = 0 and mod_capacity = 0.")


def _hf_config(config: MoMConfig) -> GPT2Config:
    eot = _GPT2_EOT if config.vocab_size > _GPT2_EOT else None
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions,
                      n_embd=config.d_model, n_layer=config.n_vanilla_layers,
                      n_head=config.n_heads, activation_function="gelu_new",
                      resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                      attn_pdrop=config.dropout, layer_norm_epsilon=config.layer_norm_eps,
                      initializer_range=config.init_std, bos_token_id=eot, eos_token_id=eot,
                      tie_word_embeddings=True)


def gpt2_lm_head(model: MoMForCausalLM) -> GPT2LMHeadModel:
    """A vanilla-preset model as the GPT2LMHeadModel with the same outputs (hf_export.py
    writes it)."""
    config = model.config
    _check_exportable(config)
    hf_model = GPT2LMHeadModel(_hf_config(config)).to(model.wte.weight.dtype)
    pairs = [(mom, hf, transpose)
             for hf, mom, transpose in tensor_map(config.n_vanilla_layers, config)]
    _transfer(pairs, dict(model.named_parameters()), hf_model.state_dict())
    return hf_model
