"""Every place mom-ds relies on a private name of torch, DeepSpeed or tiktoken, or on
DeepSpeed's internal layout, one function each, with the public API whose absence makes it necessary. A torch or
DeepSpeed upgrade breaks here or nowhere (tests/project/test_layers.py checks that no other module
touches a private name of theirs). SUPPORTED names the versions this was written and tested
against (pyproject.toml and constraints.txt say the same); `version_warning` tells a run
outside them once, at start.

torch and DeepSpeed are imported inside the functions: importing this module costs nothing.
"""
from __future__ import annotations

from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Optional

# package -> [lowest, first unsupported) major.minor
SUPPORTED = {"torch": ((2, 13), (2, 14)), "deepspeed": ((0, 19), (0, 20))}


def version_warning() -> Optional[str]:
    """One line naming every package outside SUPPORTED, or None."""
    outside = []
    for package, (low, high) in SUPPORTED.items():
        try:
            found = version(package)
        except PackageNotFoundError:
            continue
        major_minor = tuple(int(p) for p in found.split("+")[0].split(".")[:2])
        if not low <= major_minor < high:
            outside.append(f"{package} {found} (supported: >= {low[0]}.{low[1]}, < "
                           f"{high[0]}.{high[1]})")
    if not outside:
        return None
    return (f"warning: {', '.join(outside)}: mom-ds relies on private parts of these "
            f"(mom_ds/engine_adapter.py), which a new release may change; if a run fails "
            f"there, install a supported version (pip install -c constraints.txt).")


# --- torch.distributed --------------------------------------------------------------------
def set_timeout_of_every_group(timeout: timedelta) -> None:
    """The collective timeout of every process group that exists. Missing public API: a
    timeout setter for a group already created (DeepSpeed creates its expert and data groups
    with new_group and no timeout; torch's new_group takes one only at creation)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    for group in distributed_c10d._world.pg_map:
        if isinstance(group, dist.ProcessGroup):
            distributed_c10d._set_pg_timeout(timeout, group)


def rendezvous_store():
    """The default group's rendezvous TCPStore, which outlives a failed collective. Missing
    public API: a getter for the store init_process_group made from its init_method."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


# --- DeepSpeed: expert parallelism --------------------------------------------------------
def expert_groups(ep_size: int) -> tuple[Any, Any]:
    """(expert-parallel group, expert-data-parallel group) of this rank, made once per size
    in DeepSpeed's registry, where its engine finds them. Missing public API:
    deepspeed.utils.groups has no public constructor or getter for expert groups (only its
    MoE layers create them, from inside the engine)."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def expert_marker_class():
    """An nn.Module class whose presence turns DeepSpeed's expert machinery on (expert
    gradients reduced over the expert-data-parallel group, ZeRO partitioning them there).
    Missing public API: the engine recognises only its own MoE types (runtime/engine.py, by
    isinstance); of them AutoEPMoELayer is the one ZeRO-3 accepts, so the marker subclasses
    it and skips its __init__: no gate, no experts, no parameter, no computation. (DeepSpeed's
    own checkpoint code would look for AutoEP's w1/w2/w3 in it; mom-ds's checkpoints are
    written by train/checkpoint.py, by global parameter name.)"""
    import torch.distributed as dist
    from deepspeed.checkpoint.autoep_affine import legacy_uniform_autoep_placement_descriptor
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    from torch import nn

    class ExpertParallelMarker(AutoEPMoELayer):
        def __init__(self, ep_size: int, n_modules: int):
            nn.Module.__init__(self)  # not AutoEPMoELayer's: no gate, no experts
            self.ep_size, self.ep_rank = ep_size, None
            self.num_experts, self.num_local_experts = n_modules, n_modules // ep_size
            self.ep_group_name, self.ep_group = f"ep_size_{ep_size}", None
            self.expert_placement_descriptor = legacy_uniform_autoep_placement_descriptor(
                n_modules, self.num_local_experts, ep_size)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False,
                                      folding_group_handles=None) -> None:
            self.ep_group = expert_groups(self.ep_size)[0]
            self.ep_rank = dist.get_rank(self.ep_group)

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelMarker only marks the model for DeepSpeed")

    return ExpertParallelMarker


# --- DeepSpeed: communication --------------------------------------------------------------
def use_current_collectives() -> None:
    """DeepSpeed reaches torch's all-gather and reduce-scatter into one tensor through the
    functions its backend picks at start-up, torch.distributed.all_gather_into_tensor and
    reduce_scatter_tensor: torch 2.13 deprecates both (a FutureWarning on every rank at the
    first ZeRO step) for all_gather_single and reduce_scatter_single, the same collectives
    under their new names. Missing public API: a DeepSpeed setting for which torch functions
    its backend calls; its backend object's attributes are set instead."""
    import torch.distributed as dist
    from deepspeed.comm import comm

    if hasattr(dist, "all_gather_single"):
        comm.cdb.all_gather_function = dist.all_gather_single
    if hasattr(dist, "reduce_scatter_single"):
        comm.cdb.reduce_scatter_function = dist.reduce_scatter_single


# --- DeepSpeed: optimizer state, whole tensors by name (train/checkpoint.py) ---------------
def torch_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrapper (ZeRO, bf16), or the optimizer itself.
    Missing public API: an accessor for the wrapped optimizer."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def zero3_groups(engine) -> list:
    """ZeRO-3's fp32 sub-group partitions, which it puts in the param groups only for the
    duration of a step (their AdamW state lives under them). Missing public API: the
    partitions are reachable only as this optimizer attribute."""
    return list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))


def relink_optimizer_states(engine) -> None:
    """DeepSpeed 0.19's ZeRO-1/2 and bf16 optimizers link the AdamW moments to their
    parameters once, right after the first group's first step, while the other groups have
    none (stage_1_and_2.py, _optimizer_step); after mom-ds creates every moment the link is
    made again. Missing public API: a re-link after the optimizer state changed."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def zero12_fragment_numel(param) -> int:
    """Elements of this rank's fp32 master fragment of a ZeRO-1/2 parameter. Missing public
    API: the fragment's size is reachable only through the parameter's mapping."""
    return param._hp_mapping.lp_fragment_address.numel if param._hp_mapping is not None else 0


def is_zero3_partitioned(param) -> bool:
    return hasattr(param, "ds_id")


def is_zero12_mapped(param) -> bool:
    """A ZeRO-1/2 or bf16-optimizer parameter, whose fp32 master DeepSpeed's safe_*
    accessors reach. Missing public API: a predicate for it (the mapping's attribute)."""
    return hasattr(param, "_hp_mapping")


def set_zero3_partition(param, value, key: Optional[str]) -> None:
    """This rank's ZeRO-3 partition of a whole fp32 tensor (the weight, key None, or a
    moment). Missing public API: DeepSpeed 0.19's safe_set_full_* reads past the end of a
    tensor whose size the partition count does not divide (stage3.py set_full_hp_param:
    "start + length exceeds dimension size"), so the partition is written here through the
    optimizer's own partition accessors, its padding left as it is."""
    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                      optim_state_key=key)
    start = part.numel() * optimizer._get_param_partition_rank(param)
    piece = value.flatten()[start:start + part.numel()]
    part.data[:piece.numel()].copy_(piece)


def refresh_low_precision(engine) -> None:
    """Copy the fp32 masters into the weights the forward reads: what DeepSpeed runs after an
    optimizer step, here after loading the masters. ZeRO-1/2 and the bf16 optimizer expose
    it (update_lp_params); missing public API for ZeRO-3, which does it per partitioned
    sub-group."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "update_lp_params"):
        optimizer.update_lp_params()
    elif hasattr(optimizer, "fp32_partitioned_groups_flat"):
        for i in range(len(optimizer.fp32_partitioned_groups_flat)):
            optimizer._reassign_or_swap_out_partitioned_parameters(i)


# --- tiktoken --------------------------------------------------------------------------------
def tiktoken_bpe(encoding) -> tuple[dict[bytes, int], str, dict[str, int]]:
    """(mergeable ranks, split pattern, special tokens) of a tiktoken Encoding, to write it
    as a Hugging Face tokenizer (data_prep/tokenizer_export.py). Missing public API: an
    Encoding takes the three in its constructor and exposes none of them."""
    return encoding._mergeable_ranks, encoding._pat_str, encoding._special_tokens
