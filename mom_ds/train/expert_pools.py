"""Expert-parallel module pools in training: held outside the DeepSpeed engine.

With expert_parallel_size E > 1 every rank holds only its A/E attention and F/E FFN modules
of each routed block (parallel/placement.py). DeepSpeed's engine would treat them as
replicas: broadcast rank 0's modules at start, average the gradients of different modules,
partition them under ZeRO, and clip with a norm that leaves them out or averages them
(#8475). Its own expert path needs a `deepspeed.moe.layer.MoE` in the model and refuses
ZeRO-3. So the pools are taken out of the module tree DeepSpeed sees (`detach_pools`), and
`ShardedPools` gives them what the engine gives the dense parameters:
  - gradients summed over the expert-data-parallel group (reduce_expert_gradients);
  - the true global gradient norm: the engine's dense norm combined with the pools' norm
    (summed over the expert-parallel group) in the engine's own norm function, so DeepSpeed
    clips the dense gradients and logs the norm with it, and the pools clip with the same;
  - AdamW with the engine's hyper-parameters and learning rate at every step (fp32 master
    weights when the engine runs bf16);
  - checkpoint files keyed by global module names, so a run saved with one E resumes with
    any other (weights and optimizer state).
The dense parameters keep every ZeRO stage (0 to 3), since DeepSpeed never sees a pool.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, RunConfig
from ..model.config import MoMConfig
from ..parallel.expert import expert_grad_norm, reduce_expert_gradients
from ..parallel.groups import expert_parallel_groups
from ..parallel.placement import POOLS, local_to_global_name
from .engine import param_groups

FILE_PREFIX = "expert_pools_"


def detach_pools(model: nn.Module) -> nn.Module:
    """Move every routed block's (sharded) pools out of the model's module tree and return
    them in a holder with the same names (chunks.<b>.attn_modules.<i>...). The blocks still
    reach their pools through a plain attribute, so the forward is unchanged, but
    model.parameters(), state_dict(), .to() and .train() no longer see them; the holder
    follows the model's train/eval mode at every forward."""
    holder = nn.Module()
    holder.chunks = nn.ModuleList()
    for block in model.chunks:
        pools = nn.Module()
        for name in POOLS:
            setattr(pools, name, block._modules.pop(name))
            object.__setattr__(block, name, getattr(pools, name))
        holder.chunks.append(pools)

    def follow_mode(module: nn.Module, args) -> None:
        holder.train(module.training)
    model.register_forward_pre_hook(follow_mode)
    return holder


def pool_files(tag_dir: Path) -> list[Path]:
    return sorted(Path(tag_dir).glob(f"{FILE_PREFIX}*.pt"))


def load_pool_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The pools' fp32 weights by global name, from every file of a checkpoint tag."""
    weights: dict[str, torch.Tensor] = {}
    for path in pool_files(tag_dir):
        weights.update(torch.load(path, map_location="cpu", weights_only=True)["weights"])
    return weights


class ShardedPools:
    """The pools' gradient reduction, clipping, optimizer and checkpoint (see the module
    docstring). Call `reduce_gradients` after the last backward of an optimizer step and
    before engine.step(), then `step` after it."""

    def __init__(self, holder: nn.Module, engine, run: RunConfig, ep_size: int):
        self.config: MoMConfig = run.model
        self.ep_group, self.expert_dp_group = expert_parallel_groups(ep_size)
        self.ep_size, self.ep_rank = ep_size, dist.get_rank(self.ep_group)
        self.grad_clip = run.train.grad_clip
        dtype = next(engine.module.parameters()).dtype
        self.holder = holder.to(device=engine.device, dtype=dtype)
        # the holder's names are the model's (chunks.<b>.ffn_modules.<i>...), local to this rank
        self.names = {p: local_to_global_name(n, ep_size, self.ep_rank, self.config)
                      for n, p in holder.named_parameters()}
        # fp32 master copies when the engine computes in bf16; otherwise the weights themselves
        self.master = {p: p if p.dtype == torch.float32 else
                       p.detach().float().requires_grad_(True) for p in self.names}
        for p, master in self.master.items():
            if master is not p:
                p.register_post_accumulate_grad_hook(self._accumulate_into(master))
        t = run.train
        self.optimizer = torch.optim.AdamW(
            [{**g, "params": [self.master[p] for p in g["params"]]}
             for g in param_groups(holder, t.weight_decay)],
            lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
            foreach=True)  # many small tensors (a few per module): one kernel per group
        self.pool_norm: Optional[torch.Tensor] = None  # this step's, set by reduce_gradients
        self._install_global_norm(engine)

    @staticmethod
    def _accumulate_into(master: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            g = p.grad.float()
            master.grad = g if master.grad is None else master.grad.add_(g)
            p.grad = None
        return hook

    # -- the global norm, inside DeepSpeed's step ----------------------------------------------
    def _install_global_norm(self, engine) -> None:
        """Make the engine's gradient norm the whole model's: the pools' norm is combined
        with the dense one where DeepSpeed computes it (one place per optimizer kind), so
        DeepSpeed clips the dense gradients with the global norm and reports it."""
        optimizer, stage = engine.optimizer, engine.zero_optimization_stage()

        def pool_norm(like: torch.Tensor) -> torch.Tensor:  # in the optimizer's loss scale
            scale = getattr(optimizer, "loss_scale", 1.0)
            return self.pool_norm.to(like.device, torch.float) * scale

        if stage in (1, 2) and hasattr(optimizer, "scaled_global_norm"):
            dense_norm = optimizer.scaled_global_norm

            def scaled_global_norm(*args, **kwargs):
                dense = dense_norm(*args, **kwargs).float()
                return torch.hypot(dense, pool_norm(dense))
            optimizer.scaled_global_norm = scaled_global_norm
        elif stage == 3 and hasattr(optimizer, "_get_norm_groups"):
            norm_groups = optimizer._get_norm_groups

            def with_pool_norm():
                groups = norm_groups()
                return groups + [pool_norm(torch.as_tensor(groups[0]))]
            optimizer._get_norm_groups = with_pool_norm
        elif stage == 0 and not engine.bfloat16_enabled():
            def clip_fp32_gradients():
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                dense = torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g.float()) for g in grads]))
                engine._global_grad_norm = torch.hypot(dense, pool_norm(dense))
                coef = clip_coef(engine._global_grad_norm, self.grad_clip)
                if coef < 1.0:
                    torch._foreach_mul_(grads, coef)
            engine.clip_fp32_gradients = clip_fp32_gradients
        else:
            raise ConfigError(
                f"DeepSpeed's {type(optimizer).__name__} at ZeRO stage {stage}: mom-ds does not "
                f"know where it computes its gradient norm, so the module pools could not "
                f"join it (preflight refuses bf16 with ZeRO-0; this is a DeepSpeed version "
                f"whose internals moved; tested with 0.19). Fix: use ZeRO stage 1 or 2 "
                f"(ds_configs/zero1.json), or report this with your DeepSpeed version.")

    # -- one optimizer step --------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        masters = list(self.master.values())
        reduce_expert_gradients(masters, self.expert_dp_group, dist.get_world_size())
        self.pool_norm = expert_grad_norm(masters, self.ep_group)

    @torch.no_grad()
    def step(self, lr: float, global_norm: Optional[float]) -> None:
        """After engine.step(): clip with the global norm the engine computed (None: no
        clipping) and run AdamW at the engine's rate `lr`. A non-finite norm skips the
        step, as DeepSpeed skips its own."""
        masters = list(self.master.values())
        if global_norm is None or math.isfinite(float(global_norm)):
            coef = clip_coef(global_norm, self.grad_clip)
            if coef < 1.0:
                torch._foreach_mul_([m.grad for m in masters], coef)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            for p, master in self.master.items():
                if master is not p:
                    p.copy_(master)
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoint ------------------------------------------------------------------------------
    def save(self, tag_dir: Path) -> None:
        """One file per expert-parallel rank (written by the first of the replicas in its
        expert-data-parallel group): weights and AdamW state by global module name."""
        if dist.get_rank(self.expert_dp_group) != 0:
            return
        state = {"ep_size": self.ep_size, "weights": {}, "optimizer": {}}
        for p, master in self.master.items():
            name = self.names[p]
            state["weights"][name] = master.detach().cpu().clone()
            if master in self.optimizer.state:
                state["optimizer"][name] = {k: v.cpu().clone() if torch.is_tensor(v) else v
                                            for k, v in self.optimizer.state[master].items()}
        path = Path(tag_dir) / f"{FILE_PREFIX}ep{self.ep_rank:03d}_of_{self.ep_size:03d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    @torch.no_grad()
    def load(self, tag_dir: Path) -> None:
        """Take this rank's modules from a checkpoint saved with any expert-parallel size
        (the files are memory-mapped: a rank reads only the tensors it keeps)."""
        files = pool_files(tag_dir)
        if not files:
            raise FileNotFoundError(
                f"{tag_dir} has no {FILE_PREFIX}*.pt: it was written by an older mom-ds that "
                f"kept the module pools in DeepSpeed's files. Fix: `mom-convert fp32 "
                f"{tag_dir} model.pt` and start a new run with --train.init_from model.pt.")
        weights: dict[str, torch.Tensor] = {}
        states: dict[str, dict[str, Any]] = {}
        for path in files:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            weights.update(saved["weights"])
            states.update(saved["optimizer"])
        for p, master in self.master.items():
            name = self.names[p]
            if name not in weights:
                raise KeyError(f"{tag_dir}: no weights for module parameter {name}; the "
                               f"checkpoint is incomplete or was made for another model")
            master.copy_(weights[name])
            if master is not p:
                p.copy_(master)
            if name in states:
                self.optimizer.state[master] = {
                    k: (v.to(master.device, copy=True) if v.dim() else v.clone())
                    if torch.is_tensor(v) else v for k, v in states[name].items()}


def clip_coef(norm, grad_clip: float) -> float:
    """DeepSpeed's clipping rule: scale by clip / (norm + 1e-6) when that is below 1."""
    if grad_clip <= 0 or norm is None:
        return 1.0
    return min(1.0, grad_clip / (float(norm) + 1e-6))
