"""The routed blocks' module pools in training: held beside the DeepSpeed engine, not in it.

With expert_parallel_size E every rank holds only its A/E attention and F/E FFN modules of
each routed block (parallel/placement.py). DeepSpeed's engine would treat them as replicas:
broadcast rank 0's modules at start, average the gradients of different modules, partition
them under ZeRO, and clip with a norm that leaves them out or averages them (#8475). Its own
expert path needs a `deepspeed.moe.layer.MoE` in the model and refuses ZeRO-3. So the pools
leave the module tree DeepSpeed sees (`detach_pools`), and `ModulePools` gives them what the
engine gives the dense parameters:
  - gradients summed over the expert-data-parallel group (reduce_expert_gradients);
  - the true global gradient norm: the pools' norm (summed over the expert-parallel group)
    joins the dense norm inside DeepSpeed's own norm function, so DeepSpeed clips the dense
    gradients with it and reports it, and the pools clip with the same;
  - AdamW with the run's hyper-parameters at the engine's learning rate every step (fp32
    master weights when the engine computes in bf16);
  - checkpoint files by global module name (pool_files.py), so a run saved with one E
    resumes with any other, optimizer state included.
The same path serves E = 1 (one checkpoint format for every E). The dense parameters keep
every ZeRO stage, 0 to 3, since DeepSpeed never sees a pool.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ..config import ConfigError, RunConfig
from ..parallel.expert import expert_grad_norm, reduce_expert_gradients
from ..parallel.groups import expert_parallel_groups
from ..parallel.placement import POOLS, local_to_global_name
from . import pool_files
from .engine import param_groups


def detach_pools(model: nn.Module) -> nn.Module:
    """Move every routed block's pools out of the model's module tree and return them in a
    holder with the same names (chunks.<b>.attn_modules.<i>...). The blocks still reach
    their pools through a plain attribute, so the forward is unchanged, but
    model.parameters(), state_dict(), .to() and .train() no longer see them."""
    holder = nn.Module()
    holder.chunks = nn.ModuleList()
    for block in model.chunks:
        pools = nn.Module()
        for name in POOLS:
            setattr(pools, name, block._modules.pop(name))
            object.__setattr__(block, name, getattr(pools, name))
        holder.chunks.append(pools)

    def follow_mode(module: nn.Module, args) -> None:
        # The pool modules have no train/eval-dependent layer today (dropout sits in the
        # block); this keeps their `.training` true for any that is added.
        holder.train(module.training)
    model.register_forward_pre_hook(follow_mode)
    return holder


class ModulePools:
    """The pools' gradient reduction, clipping, optimizer and checkpoint (see the module
    docstring). Per optimizer step: `reduce_gradients()` after the last backward and before
    engine.step(), `step()` after it."""

    def __init__(self, holder: nn.Module, engine, run: RunConfig, ep_size: int):
        self.ep_group, self.expert_dp_group = expert_parallel_groups(ep_size)
        self.ep_size, self.ep_rank = ep_size, dist.get_rank(self.ep_group)
        self.device = engine.device
        self.grad_clip = run.train.grad_clip
        self.holder = holder.to(device=engine.device,
                                dtype=next(engine.module.parameters()).dtype)
        # the holder's names are the model's, local to this rank; files use global ones
        self.names = {p: local_to_global_name(n, ep_size, self.ep_rank, run.model)
                      for n, p in holder.named_parameters()}
        # fp32 master weights when the engine computes in bf16; otherwise the weights
        self.master = {p: p if p.dtype == torch.float32 else
                       p.detach().float().requires_grad_(True) for p in self.names}
        self.low_precision = [(p, m) for p, m in self.master.items() if m is not p]
        for p, master in self.low_precision:
            p.register_post_accumulate_grad_hook(_accumulate_into(master))
        t = run.train
        self.optimizer = torch.optim.AdamW(
            [{**g, "params": [self.master[p] for p in g["params"]]}
             for g in param_groups(holder, t.weight_decay)],
            lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
            foreach=True)  # many small tensors (a few per module): one kernel per group
        self.norm: Optional[torch.Tensor] = None  # this step's pool gradient norm
        self._join_engine_norm(engine)

    def masters(self) -> list[torch.Tensor]:
        return list(self.master.values())

    def _join_engine_norm(self, engine) -> None:
        """Make the engine's gradient norm the whole model's by adding the pools' norm where
        DeepSpeed computes its own (one place per optimizer kind; preflight refuses the
        kinds with none). The pools' gradients come from the loss as DeepSpeed scaled it, so
        they are in the units of its norms; fp16 is refused, the scale is 1."""
        optimizer, stage = engine.optimizer, engine.zero_optimization_stage()
        if getattr(optimizer, "loss_scale", 1.0) != 1.0:
            raise ConfigError("a DeepSpeed loss scale other than 1 (fp16) is not supported; "
                              "use bf16 or fp32 (train.precision).")

        def with_pools(dense: torch.Tensor) -> torch.Tensor:
            return torch.hypot(dense.float(), self.norm.to(dense.device))

        if stage in (1, 2) and hasattr(optimizer, "scaled_global_norm"):
            dense_norm_of = optimizer.scaled_global_norm
            optimizer.scaled_global_norm = lambda *a, **k: with_pools(dense_norm_of(*a, **k))
        elif stage == 3 and hasattr(optimizer, "_get_norm_groups"):
            dense_norm_groups = optimizer._get_norm_groups

            def with_pools_group() -> list:
                groups = dense_norm_groups()
                return [*groups, self.norm.to(groups[0].device)]
            optimizer._get_norm_groups = with_pools_group
        elif stage == 0 and not engine.bfloat16_enabled():
            def clip_fp32_gradients():
                dense = [p for p in engine.module.parameters() if p.grad is not None]
                engine._global_grad_norm = with_pools(get_total_norm([p.grad for p in dense]))
                clip_grads_with_norm_(dense, self.grad_clip, engine._global_grad_norm)
            engine.clip_fp32_gradients = clip_fp32_gradients
        else:
            raise ConfigError(
                f"DeepSpeed's {type(optimizer).__name__} at ZeRO stage {stage}: mom-ds does not "
                f"know where it computes its gradient norm, so the module pools cannot join "
                f"it (tested with DeepSpeed 0.19). Fix: use ZeRO stage 1 or 2 "
                f"(ds_configs/zero1.json) without data_types.grad_accum_dtype, or report "
                f"this with your DeepSpeed version.")

    def reduce_gradients(self) -> None:
        reduce_expert_gradients(self.masters(), self.expert_dp_group, dist.get_world_size())
        self.norm = expert_grad_norm(self.masters(), self.ep_group)

    @torch.no_grad()
    def step(self, lr: float, engine) -> None:
        """After engine.step(): when the engine applied its step (it skips one on a
        non-finite norm), clip with the global norm it computed (None: clipping off) and
        run AdamW at the engine's rate `lr`. No host sync: the norm stays a tensor."""
        if engine.was_step_applied():
            norm = engine.get_global_grad_norm()
            if norm is not None and self.grad_clip > 0:
                clip_grads_with_norm_(self.masters(), self.grad_clip, torch.as_tensor(norm))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            for p, master in self.low_precision:
                p.copy_(master)
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, tag_dir: Path) -> None:
        """This expert-parallel rank's file, written by the first replica of its modules."""
        if dist.get_rank(self.expert_dp_group) != 0:
            return
        weights = {self.names[p]: m.detach().cpu().clone() for p, m in self.master.items()}
        states = {self.names[p]: {k: v.cpu().clone() if torch.is_tensor(v) else v
                                  for k, v in self.optimizer.state[m].items()}
                  for p, m in self.master.items() if m in self.optimizer.state}
        pool_files.write(tag_dir, self.ep_rank, self.ep_size, weights, states)

    @torch.no_grad()
    def load(self, tag_dir: Path) -> None:
        """Take this rank's modules from a checkpoint saved with any expert-parallel size.
        Every rank agrees the checkpoint is whole before any rank goes on to DeepSpeed's
        load (a rank raising alone would leave the others waiting in a collective)."""
        weights, states = pool_files.read(tag_dir)
        missing = [n for n in self.names.values() if n not in weights]
        anyone_missing = torch.tensor(len(missing), device=self.device)
        dist.all_reduce(anyone_missing)
        if int(anyone_missing):
            raise KeyError(f"{tag_dir}: the module-pool files lack {int(anyone_missing)} "
                           f"parameters (here: {missing[:3]}); the checkpoint was made for "
                           f"another model.")
        for p, master in self.master.items():
            name = self.names[p]
            master.copy_(weights[name])
            if name in states:
                self.optimizer.state[master] = {
                    k: (v.to(master.device, copy=True) if v.dim() else v.clone())
                    if torch.is_tensor(v) else v for k, v in states[name].items()}
        for p, master in self.low_precision:
            p.copy_(master)


def _accumulate_into(master: torch.Tensor):
    """Hook moving a bf16 weight's gradient into its fp32 master (accumulating in fp32)."""
    def hook(p: torch.Tensor) -> None:
        g = p.grad.float()
        master.grad = g if master.grad is None else master.grad.add_(g)
        p.grad = None
    return hook
