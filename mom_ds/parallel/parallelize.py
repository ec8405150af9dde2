"""The one place parallelism enters a built model (torchtitan's `parallelize.py`): training,
evaluation, generation and benchmarks all call `parallelize(model, run)`; the model package
imports nothing distributed.

It applies, in this order (each step needs the one before):
1. data parallelism: with several ranks, the routers' balancing statistics become means over
   the ranks;
2. expert parallelism (parallel.expert_parallel_size): the sharded pools keep this rank's
   modules and exchange rows by all-to-all;
3. activation checkpointing (train.activation_checkpointing; training only);
4. compile (train.compile; training only): after 2, because a routed block whose pools are
   sharded stays eager (model/compiling.py);
5. the optimizer's parameter groups (training only): after 2, because sharding replaces the
   pools' parameters with this rank's slices, which must be the ones the optimizer steps.

With several ranks the routers' balancing loss uses the global batch's statistics (any world
size trains the model one process would). With expert parallelism of size E, every pool
that can be sharded (placement.sharded_pools) keeps only this rank's A/E or F/E modules,
its rows reach their owners through an AllToAllDispatcher, and its parameters become
DeepSpeed expert parameters of group `ep_size_E`: the engine then reduces their gradients
over the expert-data-parallel group only, partitions them (ZeRO-3) and their optimizer
state (ZeRO-1/2/3) over that group, and clips with the true global norm. Everything else is
dense: data-parallel over all ranks, partitioned by ZeRO like any parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import engine_adapter as adapter
from ..config import RunConfig
from ..model.compiling import compile_parts
from ..model.routers import Router
from .dispatch import AllToAllDispatcher
from .placement import POOLS, ModulePlacement, sharded_pools


@dataclass
class ParallelLayout:
    """How a parallelized model's weights are laid out (what checkpoints must know)."""

    world_size: int
    ep_size: int
    ep_rank: int
    sharded: tuple[str, ...]  # the pools (attn_pool / ffn_pool) sharded over the EP group
    ep_group: Any = None
    expert_dp_group: Any = None
    compiled: int = 0  # parts torch.compile took (4)
    param_groups: list[dict[str, Any]] = field(default_factory=list)  # the optimizer's (5)

    @property
    def group_name(self) -> str:
        return f"ep_size_{self.ep_size}"


def parallelize(model: nn.Module, run: RunConfig, training: bool = True) -> ParallelLayout:
    """Apply the steps above to a model built with the same seed on every rank (every module
    then starts from the weights a one-rank run would have), in place. Call after the
    process group has started (process_group.start) when there are several ranks; a single
    process without one is left unsharded. training=False (evaluation, generation) stops
    after expert parallelism."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = _shard_experts(model, run.parallel.expert_parallel_size, world)
    if training:
        model.set_activation_checkpointing(run.train.activation_checkpointing)
        layout.compiled = compile_parts(model) if run.train.compile else 0
        layout.param_groups = optimizer_groups(model, run.train.weight_decay)
    return layout


def _shard_experts(model: nn.Module, ep_size: int, world: int) -> ParallelLayout:
    """Steps 1 and 2."""
    sharded = sharded_pools(model.config, ep_size)
    layout = ParallelLayout(world, ep_size, 0, sharded)
    if world > 1:
        use_global_balance_stats(model)
    if not sharded:
        return layout
    layout.ep_group, layout.expert_dp_group = adapter.expert_groups(ep_size)
    layout.ep_rank = dist.get_rank(layout.ep_group)
    for b, block in enumerate(model.chunks):
        for name in sharded:
            pool = getattr(block, name)
            placement = ModulePlacement(pool.n_modules, ep_size, layout.ep_rank)
            shard_pool(pool, placement, layout.group_name)
            dispatcher = AllToAllDispatcher(layout.ep_group, b, "attention" if name == "attn_pool"
                                            else "FFN", placement)
            dispatcher.timings = {}  # the monitor logs all-to-all time per step
            setattr(block, "attn_dispatcher" if name == "attn_pool" else "ffn_dispatcher",
                    dispatcher)
    config = model.config
    n_modules = config.n_ffn_modules if "ffn_pool" in sharded else config.n_attn_modules
    model.expert_parallel_marker = adapter.expert_marker_class()(ep_size, n_modules)
    return layout


def shard_pool(pool: nn.Module, placement: ModulePlacement, group_name: str) -> None:
    """Keep this rank's rows of every stacked tensor of the pool, tagged as DeepSpeed expert
    parameters of `group_name` (deepspeed.moe.utils.is_moe_param; ZeRO-3 partitions them
    over that group's expert-data-parallel group)."""
    for projection in pool.children():
        for name, param in list(projection.named_parameters(recurse=False)):
            local = nn.Parameter(param.detach()[placement.owned()].clone())
            local.allreduce = False
            local.group_name = group_name
            local.ds_zero_placement_family = "autoep_expert"
            local.ds_zero_partition_group_name = group_name
            setattr(projection, name, local)
    pool.n_modules = placement.per_rank
    pool.placement = placement


def is_expert_parameter(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


class _AllReduceSum(torch.autograd.Function):
    """A differentiable sum over the group: each rank's gradient is the sum of every rank's
    gradient of the result. torch.distributed.nn.functional.all_reduce computed this but is
    deprecated (a FutureWarning per rank), and its suggested replacement,
    torch.distributed._functional_collectives, is private; the backward applies itself, so
    a double backward reduces again, as the deprecated one did."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def use_global_balance_stats(model: nn.Module, group=None) -> None:
    """Average the balancing loss' statistics (f, P) over the data-parallel group, so the
    loss is that of the global batch whatever the number of ranks (differentiable)."""
    size = dist.get_world_size(group)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t, group) / size

    for module in model.modules():
        if isinstance(module, Router) and module.learned:
            module.stat_mean = mean


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """GPT-2-style AdamW groups, each split by DeepSpeed into its dense and expert parts
    (split_params_into_different_moe_groups_for_optimizer): the groups ZeRO reduces and
    partitions over the right process groups. Weight matrices decay (an untied head's
    too); biases, norms and the embeddings do not (nor, then, a head tied to the token
    embedding). A pool's stacked biases and norm weights are 2-D (modules x width) but
    vectors of their modules."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                  for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_pool = any(f".{pool}." in f".{name}" for pool in POOLS)
        matrix = p.dim() == 3 if in_pool else p.dim() >= 2 and id(p) not in embeddings
        (decay if matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return split_params_into_different_moe_groups_for_optimizer(groups)
