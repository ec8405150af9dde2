"""Hugging Face interop for every block family (hf_families.py: GPT-2; Llama, Mistral,
Qwen2).

`from_hf` turns a donor checkpoint into the vanilla preset of its family with the same
outputs, or, given a layout, cuts it into modules by the two-stage layer map of mom-spec.md
section 1, which is also sparse upcycling when the pools have more modules than the donor
has layers (`donor_layer_map`). `hf_vanilla_model` turns a vanilla preset back into its
family's transformers model (hf_export.py writes it, and every other model as remote code).

Both directions are driven by one table, `tensor_map`, so what is imported is exactly what
is exported.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from data_prep.hub import cache_only, offline_note

from .config import MoMConfig
from .hf_families import Family, HFInteropError, family_of, family_of_donor
from .model import MoMForCausalLM

# The weight files read (sharded or not); pytorch_model.bin is a pickle and is never read.
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


class LayerTarget(NamedTuple):
    """Where one donor layer goes: the module paths (in MoMForCausalLM) receiving its
    attention part and its FFN part; None drops that part (a pool smaller than max(A, F))."""

    attn: Optional[str]
    ffn: Optional[str]


def _vanilla_target(path: str) -> LayerTarget:
    return LayerTarget(f"{path}.attn", f"{path}.ffn")


def _outside_pools(layout: MoMConfig) -> int:
    """Donor layers that become vanilla layers: bottom, anchors, top."""
    return layout.n_bottom + layout.n_top + layout.n_routed_blocks * int(layout.anchor_layers)


def layers_per_block(donor_layers: int, layout: MoMConfig) -> int:
    """m: the donor layers each routed block's pools are made of (checked: an even split,
    1 <= m <= max(A, F)); 0 without routed blocks."""
    width = max(layout.n_attn_modules, layout.n_ffn_modules)
    left = donor_layers - _outside_pools(layout)
    blocks = layout.n_routed_blocks
    if blocks == 0 and left == 0:
        return 0
    if blocks and left % blocks == 0 and 1 <= left // blocks <= width:
        return left // blocks
    terms = f"n_bottom ({layout.n_bottom}) + n_top ({layout.n_top})"
    if blocks:
        terms += f" + anchors ({blocks * int(layout.anchor_layers)})"
        need = (f"the {max(left, 0)} left must split evenly into the {blocks} routed "
                f"block(s), at least 1 and at most max(A, F) = {width} each (fewer than "
                f"max(A, F): copies, as upcycling)")
    else:
        need = "nothing may be left"
    # the n_top that fits, the rest of the layout unchanged: the most layers per block
    below_top = donor_layers - (_outside_pools(layout) - layout.n_top)
    m = min(width, below_top // blocks) if blocks else 0
    if (m >= 1 or not blocks) and below_top >= 0:
        hint = f"e.g. n_top = {below_top - blocks * m}"
    else:
        hint = (f"the bottom layers and anchors leave {max(below_top, 0)} of the donor's "
                f"layers for {blocks} routed block(s): fewer bottom layers or blocks")
    raise HFInteropError(
        f"the donor has {donor_layers} layers; {terms} take {_outside_pools(layout)} and {need}. "
        f"Fix: choose the layout to fit the donor ({hint}).")


def donor_layer_map(donor_layers: int, layout: MoMConfig) -> list[tuple[int, LayerTarget]]:
    """Where each donor layer goes, as (donor layer, target); a layer may go to several.

    The first n_bottom layers become the bottom layers; each routed block takes the next m
    layers (layers_per_block), then one layer as its anchor; the rest become the top
    layers. Module j of a block's pools is made of the block's layer j mod m: its attention
    part for attention module j (j < A), its FFN part for FFN module j (j < F). With
    m = max(A, F) this is the two-stage map of mom-spec section 1 (each layer a module of
    its own); with fewer layers, pools are filled with copies: m = 1 is sparse upcycling
    (Komatsuzaki et al. 2022), the donor's FFN copied into every expert of a MoE layer.
    Where m does not divide max(A, F) the first layers of the block get one copy more
    than the others. A vanilla layout (n_routed_blocks = 0) is the identity map onto
    bottom + top.
    """
    m = layers_per_block(donor_layers, layout)
    mod_layers = set(layout.mod_layer_indices())
    # A MoD bottom block wraps its layer in `.layer` beside its fresh router.
    targets = [(i, _vanilla_target(f"bottom.{i}.layer" if i in mod_layers else f"bottom.{i}"))
               for i in range(layout.n_bottom)]
    A, F = layout.n_attn_modules, layout.n_ffn_modules
    for c in range(layout.n_routed_blocks):
        first = len({layer for layer, _ in targets})
        targets += [(first + j % m, LayerTarget(f"chunks.{c}.attn_modules.{j}" if j < A else None,
                                                f"chunks.{c}.ffn_modules.{j}" if j < F else None))
                    for j in range(max(A, F))]
        if layout.anchor_layers:
            targets.append((first + m, _vanilla_target(f"anchors.{c}")))
    first = donor_layers - layout.n_top
    targets += [(first + i, _vanilla_target(f"top.{i}")) for i in range(layout.n_top)]
    return targets


def tensor_map(family: Family, donor_layers: int, layout: MoMConfig
               ) -> list[tuple[tuple[str, ...], str, bool]]:
    """(donor tensor names, MoM parameter name, conv1d) for every tensor the map places;
    the donor tensors are concatenated along their first dimension into the MoM tensor."""
    pairs = [((hf,), mom, False) for hf, mom in family.global_tensors(layout)]
    for layer, target in donor_layer_map(donor_layers, layout):
        for tensor in family.layer_tensors(layout):
            module = getattr(target, tensor.part)
            if module is not None:
                names = tuple(f"{family.layer_prefix}.{layer}.{n}" for n in tensor.hf)
                pairs.append((names, f"{module}.{tensor.mom}", tensor.conv1d))
    return pairs


def _import(pairs: list[tuple[tuple[str, ...], str, bool]], source: dict[str, torch.Tensor],
            dest: dict[str, torch.Tensor]) -> None:
    """dest[d] = the concatenation of source[s...] (each transposed where conv1d), for every
    pair, after checking the shape, so a bad checkpoint names its tensor instead of failing
    in copy_."""
    with torch.no_grad():
        for names, dst, conv1d in pairs:
            missing = [n for n in names if n not in source]
            if missing:
                raise HFInteropError(f"the checkpoint has no tensor {missing[0]}. Fix: pass a "
                                     f"complete checkpoint of a causal LM (with its head).")
            value = torch.cat([source[n].t() if conv1d else source[n] for n in names])
            if value.shape != dest[dst].shape:
                shapes = " + ".join(str(tuple(source[n].shape)) for n in names)
                raise HFInteropError(
                    f"{' + '.join(names)} has shape {shapes} but {tuple(dest[dst].shape)} is "
                    f"expected for {dst}. Fix: use a checkpoint whose config matches its "
                    f"weights.")
            dest[dst].copy_(value)


def _export(pairs: list[tuple[tuple[str, ...], str, bool]], source: dict[str, torch.Tensor],
            dest: dict[str, torch.Tensor]) -> None:
    """The inverse of _import: each MoM tensor split back into its donor tensors."""
    with torch.no_grad():
        for names, src, conv1d in pairs:
            sizes = [dest[n].shape[1 if conv1d else 0] for n in names]
            for name, part in zip(names, source[src].split(sizes)):
                dest[name].copy_(part.t() if conv1d else part)


# --- import ------------------------------------------------------------------------------
def _from_pretrained(loader, path: Union[str, Path]):
    """`loader.from_pretrained(path)` (a model: with its loading info); a hub name comes
    from the cache alone when the hub cannot be reached (data_prep/hub.py), and a miss is
    one error naming the name."""
    weights = loader is not AutoConfig
    # never a pickled .bin; the loading info names weights the checkpoint lacks
    options = {"use_safetensors": True, "output_loading_info": True} if weights else {}
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


def _donor_weights(path: Union[str, Path]) -> PreTrainedModel:
    model, info = _from_pretrained(AutoModelForCausalLM, path)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise HFInteropError(f"{path} lacks {missing[0]}{more}, which transformers would fill "
                             f"with random values. Fix: pass a complete causal-LM checkpoint "
                             f"(a *ForCausalLM saved with save_pretrained).")
    return model


def vanilla_config(path: Union[str, Path]) -> MoMConfig:
    """The vanilla preset a donor checkpoint (directory or hub name) imports as, read from
    its config alone (no weights loaded)."""
    hf_config = _from_pretrained(AutoConfig, path)
    return family_of_donor(hf_config).vanilla(hf_config)


# What a layout must share with its donor: (what the message names, the value).
_SHAPE = (("block", lambda c: c.block), ("vocab_size", lambda c: c.vocab_size),
          ("n_positions", lambda c: c.n_positions), ("d_model", lambda c: c.d_model),
          ("n_heads", lambda c: c.n_heads), ("n_kv_heads (0: n_heads)", lambda c: c.kv_heads),
          ("ffn_hidden (0: the family's default)", lambda c: c.ffn_width),
          ("layer_norm_eps", lambda c: c.layer_norm_eps),
          ("rope_theta", lambda c: c.rope_theta if c.block == "llama" else None),
          ("qkv_bias", lambda c: c.qkv_bias),
          ("tie_word_embeddings", lambda c: c.tie_word_embeddings))


def _check_layout_shape(donor: MoMConfig, layout: MoMConfig) -> None:
    for field, value in _SHAPE:
        if value(layout) != value(donor):
            name = field.split(" ")[0]
            raise HFInteropError(
                f"layout model.{field} gives {value(layout)!r} but the donor's is "
                f"{value(donor)!r}. Fix: set model.{name} = {getattr(donor, name)!r}; the donor "
                f"fixes the shape, the layout only chooses how its layers are arranged.")


def from_hf(path_or_model: Union[str, Path, PreTrainedModel],
            layout: Optional[MoMConfig] = None) -> MoMForCausalLM:
    """A MoMForCausalLM initialised from a donor checkpoint (directory, hub name, or model)
    of any family in hf_families.py.

    Without layout: the vanilla preset of the donor's family with the same outputs. With
    layout: the donor's layers placed by `donor_layer_map` (two-stage initialisation, or
    upcycling where the pools outnumber the donor's layers); embeddings, the final norm and
    the head are copied, routers (and MoD routers) keep the model's fresh initialisation.
    """
    given = isinstance(path_or_model, PreTrainedModel)
    # the donor's config alone first: a foreign checkpoint or a layout that does not fit
    # is refused before any weight is read
    hf_config = path_or_model.config if given else _from_pretrained(AutoConfig, path_or_model)
    family = family_of_donor(hf_config)
    vanilla = family.vanilla(hf_config)
    layout = layout if layout is not None else vanilla
    _check_layout_shape(vanilla, layout)
    pairs = tensor_map(family, vanilla.n_bottom, layout)  # checks the layer count
    donor = path_or_model if given else _donor_weights(path_or_model)
    model = MoMForCausalLM(layout)
    _import(pairs, donor.state_dict(), model.per_module_tensors())
    return model


# --- export ------------------------------------------------------------------------------
def is_vanilla(config: MoMConfig) -> bool:
    """A vanilla preset: no routed block, no MoD block (what the family's transformers model
    can hold)."""
    return not (config.n_routed_blocks or config.mod_layer_indices())


def hf_vanilla_model(model: MoMForCausalLM) -> PreTrainedModel:
    """A vanilla-preset model as its family's transformers model with the same outputs:
    GPT2LMHeadModel, LlamaForCausalLM, or Qwen2ForCausalLM where Q/K/V have biases
    (hf_export.py writes it)."""
    config = model.config
    if not is_vanilla(config):
        raise HFInteropError(
            f"a transformers {config.block} model holds a vanilla preset only, but this model "
            f"has {config.n_routed_blocks} routed block(s) and "
            f"{len(config.mod_layer_indices())} MoD block(s). Fix: export it with "
            f"hf_export.to_hf (remote code), or use a model with n_routed_blocks = 0 and "
            f"mod_capacity = 0.")
    family = family_of(config)
    hf_model = family.export(config).to(model.wte.weight.dtype)
    _export(tensor_map(family, config.n_vanilla_layers, config),
            dict(model.named_parameters()), hf_model.state_dict())
    return hf_model
