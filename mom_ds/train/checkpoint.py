"""mom-train's checkpoints: the collective save and load of a DeepSpeed engine's state, in
the format of mom_ds/checkpoints/format.py (its docstring draws the layout). Every tensor
goes to and comes from the engine whole, by parameter name, through DeepSpeed's own
accessors (deepspeed.utils safe_get/set_full_fp32_param and _optimizer_state, which gather
and scatter ZeRO's partitions at every stage; engine_adapter for what they lack), so a run
resumes with another number of ranks or another expert_parallel_size, and with the same
layout continues bit for bit. Also each rank's RNG state, the free-space check and the
refusal of non-finite weights; the files themselves are written and read by format.py.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import engine_adapter as adapter
from ..checkpoints.format import (DENSE, CheckpointError, experts_file, load_file, prune,
                                  read_tag, size_text, tag_for, write_file, write_manifest)
from ..checkpoints.published import publish, record_best
from ..parallel.parallelize import ParallelLayout
from ..parallel.placement import ModulePlacement
from .health import stop

MOMENTS = ("exp_avg", "exp_avg_sq")


def rng_state() -> dict[str, Any]:
    # numpy's key array is stored as a tensor: the file then loads with weights_only=True
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- the engine's state, whole tensors by name ----------------------------------------------
def _whole(engine, param: torch.Tensor, key: Optional[str]) -> torch.Tensor:
    """The fp32 weight (key None) or AdamW moment of one parameter, unpartitioned, on CPU.
    Collective under ZeRO (every rank calls it for the same parameters in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else \
        safe_get_full_optimizer_state(param, key)
    if value is None:  # ZeRO-0 in fp32: the torch optimizer steps the parameter itself
        state = adapter.torch_optimizer(engine).state.get(param, {})
        value = param.detach() if key is None else state.get(key, torch.zeros_like(param))
    return value.detach().float().cpu().clone()


def _prepare_optimizer_state(engine) -> None:
    """Make every AdamW moment reachable through DeepSpeed's accessors. A fresh engine has
    none yet (torch creates them at the first step), so they are created as that step
    would, at zero, and linked to their parameters again (engine_adapter)."""
    base = adapter.torch_optimizer(engine)
    for p in [*(p for group in base.param_groups for p in group["params"]),
              *adapter.zero3_groups(engine)]:
        state = base.state[p]
        if "exp_avg" not in state:
            state.update(step=torch.zeros((), dtype=torch.float32),
                         exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    adapter.relink_optimizer_states(engine)


def _adam_step(engine) -> int:
    for state in adapter.torch_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def engine_state(engine, model) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: {"weight", "exp_avg", "exp_avg_sq"}} of this rank's parameters."""
    _prepare_optimizer_state(engine)
    return {name: {"weight": _whole(engine, p, None),
                   **{key: _whole(engine, p, key) for key in MOMENTS}}
            for name, p in model.named_parameters() if p.requires_grad}


def load_engine_state(engine, model, state: dict[str, dict[str, torch.Tensor]],
                      adam_step: int) -> None:
    """Put whole tensors (already cut to this rank's modules) back into the engine: its
    fp32 masters and moments through DeepSpeed's setters, then the low-precision copies the
    forward uses from the masters."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _prepare_optimizer_state(engine)
    base = adapter.torch_optimizer(engine)
    partitioned = False
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        entry = state[name]
        if adapter.is_zero3_partitioned(p):
            partitioned = True
            for key in (None, *MOMENTS):
                adapter.set_zero3_partition(p, entry["weight" if key is None else key], key)
        elif adapter.is_zero12_mapped(p):
            partitioned = True
            device = engine.device
            safe_set_full_fp32_param(p, entry["weight"].to(device))
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, entry[key].to(device), key)
        else:  # ZeRO-0 in fp32: the optimizer's state is keyed by the parameter itself
            with torch.no_grad():
                p.copy_(entry["weight"])
                for key in MOMENTS:
                    base.state[p][key].copy_(entry[key])
    for slot in base.state.values():
        if "step" in slot:
            slot["step"] = torch.full_like(torch.as_tensor(slot["step"]), float(adam_step)) \
                if torch.is_tensor(slot["step"]) else adam_step
    if partitioned:
        adapter.refresh_low_precision(engine)


# --- save -----------------------------------------------------------------------------------
def save(engine, model, layout: ParallelLayout, ckpt_dir: str | Path, step: int,
         client_state: dict[str, Any], keep: int) -> str:
    """Write checkpoint `step`, then publish it. Collective: all ranks call it."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    check_space(ckpt_dir, checkpoint_bytes(model), step)
    if rank == 0:
        if tag_dir.exists():  # an unpublished earlier attempt at this step
            shutil.rmtree(tag_dir)
        tag_dir.mkdir(parents=True)
    dist.barrier()
    state = engine_state(engine, model)
    _refuse_non_finite(state, step, ckpt_dir, tag_dir)
    experts = {n for n in state if _is_sharded(n, layout)}
    client = {**client_state, "adam_step": _adam_step(engine),
              "world_size": layout.world_size, "expert_parallel_size": layout.ep_size}
    if rank == 0:
        dense = {n: v for n, v in state.items() if n not in experts}
        write_file({"client": client, "params": dense}, tag_dir / DENSE)
    if experts and dist.get_rank(layout.expert_dp_group) == 0:
        owned = {n: _owned(n, layout, model) for n in experts}
        write_file({"params": {n: state[n] for n in experts},
                "modules": {n: (s.start, s.stop) for n, s in owned.items()}},
               tag_dir / experts_file(layout.ep_rank, layout.ep_size))
    write_file({"rng": rng_state()}, tag_dir / f"run_state_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk before the checkpoint is published
    if rank == 0:
        write_manifest(tag_dir)
        publish(ckpt_dir, tag)
        record_best(ckpt_dir, tag, client_state.get("eval_loss"))
        if keep:
            prune(ckpt_dir, keep)
    dist.barrier()
    return tag


def checkpoint_bytes(model) -> int:
    """About what one checkpoint takes: fp32 weight and two AdamW moments per trained
    parameter (numel before ZeRO-3 partitioning)."""
    return sum(12 * getattr(p, "ds_numel", p.numel()) for p in model.parameters()
               if p.requires_grad)


def check_space(ckpt_dir: Path, needed: int, step: int) -> None:
    """Refuse to start writing a checkpoint that cannot fit (a full disk mid-write is an
    unreadable error and a half-written tag). Collective: every rank checks its own file
    system and all agree."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ckpt_dir).free
    short = torch.tensor(float(free < 1.1 * needed))
    dist.all_reduce(short)
    if float(short):
        raise CheckpointError(f"no space left on {ckpt_dir} for the checkpoint of step {step}: "
                              f"it needs about {size_text(needed)} plus a 10% margin "
                              f"({size_text(int(1.1 * needed))}), "
                              f"{size_text(free)} are free on this rank. Fix: free space "
                              f"or lower train.keep_checkpoints, then --resume from the last "
                              f"published checkpoint.")


def _refuse_non_finite(state: dict[str, dict[str, torch.Tensor]], step: int, ckpt_dir: Path,
                       tag_dir: Path) -> None:
    """A checkpoint of non-finite weights is never written, so it can neither be published
    nor prune a good one. Collective: every rank judges the tensors it holds."""
    bad = [name for name, entry in state.items() if not torch.isfinite(entry["weight"]).all()]
    flag = torch.tensor(float(len(bad)))
    dist.all_reduce(flag)
    if float(flag):
        if dist.get_rank() == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        where = f" (first: {bad[0]})" if bad else " on another rank"
        raise stop(f"{int(float(flag))} weight tensor(s) are not finite{where}", step, ckpt_dir)


def _is_sharded(name: str, layout: ParallelLayout) -> bool:
    return any(f".{pool}." in f".{name}" for pool in layout.sharded)


def _pool_size(name: str, config) -> int:
    return config.n_attn_modules if ".attn_pool." in name else config.n_ffn_modules


def _owned(name: str, layout: ParallelLayout, model) -> slice:
    return ModulePlacement(_pool_size(name, model.config), layout.ep_size, layout.ep_rank).owned()


def load(engine, model, layout: ParallelLayout, ckpt_dir: str | Path, tag: str
         ) -> dict[str, Any]:
    """Resume from checkpoint `tag` (choose_tag), whatever world size and expert-parallel
    size wrote it: weights, AdamW state and schedule into the engine, RNG restored (or,
    on another world size, re-derived). Returns the client state. Every rank checks the
    checkpoint before any rank enters a collective of the load."""
    ckpt_dir = Path(ckpt_dir)
    problem, client, params = "", {}, {}
    try:
        client, params = read_tag(ckpt_dir / tag)
        local = _cut_to_this_rank(params, model, layout)
        same_layout = client["world_size"] == layout.world_size
        rank_file = ckpt_dir / tag / f"run_state_rank{dist.get_rank()}.pt"
        rng = load_file(rank_file)["rng"] if same_layout and rank_file.is_file() \
            else None
    except (CheckpointError, KeyError, ValueError) as err:
        problem = str(err)
    failed = torch.tensor(float(bool(problem)))
    dist.all_reduce(failed)
    if problem or float(failed):
        raise CheckpointError(problem or "another rank could not read the checkpoint (its "
                              "message names the cause)")
    load_engine_state(engine, model, local, client["adam_step"])
    _set_schedule_step(engine.lr_scheduler, int(client["step"]))
    if rng is not None:
        set_rng_state(rng)
    else:  # another world size: each rank's stream is re-derived from the seed and step
        seed = int(client["config"]["train"]["seed"])
        torch.manual_seed(hash((seed, dist.get_rank(), int(client["step"]))) % 2 ** 63)
    return client


def _set_schedule_step(scheduler, step: int) -> None:
    """The LambdaLR the engine steps is a pure function of the step (optimizer.lr_factor); its
    state is that step, whatever parameter groups this layout has."""
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    # through its public state dict: what get_last_lr() returns has no setter
    state = scheduler.state_dict()
    state.update(last_epoch=step, _last_lr=rates)
    scheduler.load_state_dict(state)


def _cut_to_this_rank(params: dict[str, dict[str, torch.Tensor]], model,
                      layout: ParallelLayout) -> dict[str, dict[str, torch.Tensor]]:
    """The whole tensors cut to the modules this rank holds, each checked against the
    model, so a checkpoint of another model is named before any collective."""
    local = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name not in params:
            raise CheckpointError(f"the checkpoint has no parameter {name}: it was written "
                                  f"for another model. Fix: resume with the run's own config "
                                  f"(config.yaml in the run directory).")
        entry = params[name]
        if _is_sharded(name, layout):
            cut = _owned(name, layout, model)
            entry = {k: v[cut] for k, v in entry.items()}
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(entry["weight"].shape) != shape:
            raise CheckpointError(f"the checkpoint's {name} has shape "
                                  f"{tuple(entry['weight'].shape)}, this model's {shape}: it "
                                  f"was written for another model. Fix: resume with the run's "
                                  f"own config (config.yaml in the run directory).")
        local[name] = entry
    return local
