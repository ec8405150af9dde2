"""Expert parallelism applied to a MoMForCausalLM, as a transform (the model is written
once; this file is our `parallelize.py`): shard the module pools, install the all-to-all
dispatcher, make the balancing loss global, reduce expert gradients over the right group,
measure the pools' gradient norm, and move weights between expert-parallel sizes."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from ..model.routers import Router
from .dispatch import AllToAllDispatcher
from .groups import expert_parallel_groups
from .placement import (global_to_local_name, is_expert_parameter, local_to_global_name,
                        shard_module_pools)


def apply_expert_parallel(model: nn.Module, ep_size: int) -> nn.Module:
    """Each rank keeps and computes A/E attention and F/E FFN modules of every routed block
    and reaches the others by all-to-all (placement.shard_module_pools). Call after building
    the full model with the same seed on every rank (every module then starts from the
    weights a 1-rank run would have)."""
    ep_group, _ = expert_parallel_groups(ep_size)
    config = model.config

    def dispatcher(block_index, attn_placement, ffn_placement):
        return AllToAllDispatcher(ep_group, block_index, config.depth,
                                  [attn_placement, ffn_placement], config.capacity_factor,
                                  config.top_k)

    shard_module_pools(model, ep_size, dist.get_rank(ep_group), dispatcher)
    return model


def use_global_balance_stats(model: nn.Module, group=None) -> None:
    """Average the balancing loss' statistics (f, P) over the data-parallel group, so the
    loss is that of the global batch whatever the number of ranks (differentiable)."""
    size = dist.get_world_size(group)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return dist_fn.all_reduce(t, group=group) / size

    for module in model.modules():
        if isinstance(module, Router) and module.learned:
            module.stat_mean = mean


def reduce_expert_gradients(params: Iterable[torch.Tensor], expert_dp_group,
                            dp_size: int) -> None:
    """Module gradients: sum over the ranks that hold the same modules, divide by the whole
    data-parallel size (each rank's loss is its micro-batch mean; the all-to-all backward
    already brought every source rank's contribution to the owner). DeepSpeed's engine
    would average them over every rank as if they were replicas, so this is done here."""
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if grads and dist.get_world_size(expert_dp_group) > 1:
        # one collective for all of them, not one per tensor (a few per module)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=expert_dp_group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    for g in grads:
        g.div_(dp_size)


def expert_grad_norm(params: Iterable[torch.Tensor], ep_group) -> torch.Tensor:
    """L2 norm of the gradient of the whole module pools (fp32): each expert-parallel rank
    holds different modules, so their squared norms are summed over the expert-parallel
    group (DeepSpeed #8475 averaged them instead)."""
    sq = None
    for p in params:
        if p.grad is not None:
            term = p.grad.detach().float().pow(2).sum()
            sq = term if sq is None else sq + term
    if sq is None:
        raise ValueError("expert_grad_norm: no module parameter has a gradient")
    if dist.get_world_size(ep_group) > 1:
        dist.all_reduce(sq, group=ep_group)
    return sq.sqrt()


def full_state_dict(model: nn.Module, ep_group=None) -> Optional[dict[str, torch.Tensor]]:
    """The state dict of the unsharded model (global module names), gathered over the
    expert-parallel group; returned on every rank (CPU tensors)."""
    local = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ep = getattr(model, "expert_parallel", (1, 0))
    if ep[0] == 1:
        return local
    shards: list = [None] * ep[0]
    dist.all_gather_object(shards, (ep[1], local), group=ep_group)
    full: dict[str, torch.Tensor] = {}
    for rank, sd in shards:
        for name, tensor in sd.items():
            full[local_to_global_name(name, ep[0], rank, model.config)] = tensor
    return full


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a model sharded with any expert-parallel size
    (including 1): each rank takes the modules it owns."""
    ep_size, ep_rank = getattr(model, "expert_parallel", (1, 0))
    local = {}
    for name, tensor in full.items():
        mine = global_to_local_name(name, ep_size, ep_rank, model.config)
        if mine is not None:
            local[mine] = tensor
    model.load_state_dict(local)
