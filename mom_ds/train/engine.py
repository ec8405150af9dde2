"""The DeepSpeed engine: the completed DeepSpeed config and `deepspeed.initialize` over the
parameter groups of parallel/parallelize.py.

`build_ds_config` runs before any process group exists: it fills the batch sizes, the
gradient clipping, the optimizer and the precision from the RunConfig, and refuses a JSON
that disagrees with them, so a mismatch is one clear error instead of a failure inside
DeepSpeed on every rank.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import engine_adapter as adapter
from ..config import ConfigError, RunConfig
from ..parallel.parallelize import engine_param_groups
from .ds_schema import auto_values, check_deepspeed_json, resolve_auto


def world_size_from_env() -> int:
    """Ranks this run will have, known before the process group starts (every launcher
    we support, deepspeed, torchrun, srun through our scripts, exports WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_type() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def use_bf16(run: RunConfig, device: str) -> bool:
    if run.train.precision == "auto":
        # bf16 on CPU is emulated and slower than fp32, so auto means bf16 on GPUs only.
        return device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return run.train.precision == "bf16"


def build_ds_config(run: RunConfig, ds_json: dict[str, Any], world_size: int,
                    device: str) -> dict[str, Any]:
    """The DeepSpeed JSON completed from run.train; ConfigError where they disagree or where
    DeepSpeed's own parser refuses the JSON (ds_schema.py)."""
    t = run.train
    where = f"DeepSpeed config {run.parallel.deepspeed}"
    if isinstance(ds_json, dict) and "scheduler" in ds_json:
        raise ConfigError(f"{where} has a 'scheduler' block. Fix: remove it; mom-train builds "
                          f"the warmup + cosine schedule from train.* (a Trainer block of "
                          f"\"auto\" values still names another schedule in its type).")
    wanted = {"train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": t.grad_accum_steps,
              "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
              "gradient_clipping": t.grad_clip}
    bf16 = use_bf16(run, device)
    ds_json = resolve_auto(ds_json, auto_values(run, wanted, bf16), where)
    check_deepspeed_json(ds_json, where)
    cfg = copy.deepcopy(ds_json)
    _check_optimizer_block(cfg.pop("optimizer", None), run, where)
    for key, value in wanted.items():
        if key in cfg and cfg[key] != value:
            raise ConfigError(
                f"{where}: {key} = {cfg[key]} but the run gives {value} (train.micro_batch_size "
                f"{t.micro_batch_size} x train.grad_accum_steps {t.grad_accum_steps} x world "
                f"size {world_size}). Fix: drop {key} from the JSON (mom-train fills it in) or "
                f"make train.* agree with it.")
        cfg[key] = value
    if "fp16" in cfg and cfg["fp16"].get("enabled", False):
        raise ConfigError(f"{where} enables fp16. Fix: use bf16 (train.precision bf16); fp16 "
                          f"loss scaling is not supported by mom-train.")
    json_bf16 = cfg.get("bf16", {}).get("enabled")
    if json_bf16 is not None and t.precision != "auto" and bool(json_bf16) != bf16:
        raise ConfigError(f"{where} sets bf16.enabled = {json_bf16} but train.precision = "
                          f"{t.precision!r}. Fix: remove the bf16 block or make them agree.")
    if json_bf16 is None:
        cfg["bf16"] = {"enabled": bf16}
    if t.nan_policy == "skip":
        _check_skippable(cfg, bf16, where)
    if t.compile and cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        # ZeRO-3 gathers each partitioned parameter in a module hook; torch.compile traces
        # the compiled layers past those hooks and meets 0-element parameters.
        raise ConfigError(f"train.compile = true does not work with ZeRO stage 3 ({where}): "
                          f"torch.compile traces the layers with their parameters still "
                          f"partitioned. Fix: ZeRO stage 1 or 2, or train.compile false.")
    cfg["optimizer"] = {"type": "AdamW", "params": {
        "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay,
        # DeepSpeed's FusedAdam needs a CUDA build; elsewhere torch's AdamW is the same math.
        "torch_adam": device != "cuda"}}
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    if offload not in (None, "none"):
        cfg["optimizer"]["params"].pop("torch_adam")  # offload runs DeepSpeedCPUAdam
    cfg.setdefault("steps_per_print", 10 ** 9)  # our loop prints; keep DeepSpeed quiet
    return cfg


def _check_optimizer_block(block: Any, run: RunConfig, where: str) -> None:
    """An optimizer block may stay (a Trainer JSON has one, often all "auto") if it asks for
    what mom-train builds anyway: AdamW with train.*'s settings."""
    if block is None:
        return
    t = run.train
    recipe = {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
              "weight_decay": t.weight_decay}
    differs = [f"type {block.get('type')!r}"] if str(block.get("type")).lower() != "adamw" \
        else []
    differs += [f"params.{key} = {value!r}" + (f" but the recipe gives {recipe[key]!r}"
                                               if key in recipe else " (not from train.*)")
                for key, value in block.get("params", {}).items() if recipe.get(key) != value]
    if differs:
        raise ConfigError(f"{where} has an 'optimizer' block ({'; '.join(differs)}). Fix: "
                          f"remove it; mom-train builds AdamW from train.* (a block of AdamW "
                          f"with \"auto\" params is accepted).")


def _check_skippable(cfg: dict[str, Any], bf16: bool, where: str) -> None:
    """nan_policy skip is DeepSpeed's own: its bf16 optimizer and its ZeRO optimizers find a
    non-finite gradient and skip the step (weights, Adam moments, LR schedule untouched). In
    fp32 without ZeRO the engine steps torch's optimizer directly, which applies the NaN."""
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if not bf16 and stage == 0:
        raise ConfigError(f"train.nan_policy = 'skip' needs DeepSpeed's overflow check, which "
                          f"runs in bf16 or under ZeRO; {where} is ZeRO stage 0 in fp32. Fix: use "
                          f"ds_configs/zero1.json (or another ZeRO stage), train.precision bf16, "
                          f"or train.nan_policy stop.")
    if bf16 and cfg["bf16"].get("check_grad_overflow") is False:
        raise ConfigError(f"{where} sets bf16.check_grad_overflow = false, which turns off the "
                          f"check train.nan_policy = 'skip' relies on. Fix: remove that key or "
                          f"use train.nan_policy stop.")


def init_distributed(run: RunConfig, verbose: bool = False) -> None:
    """The process group. DeepSpeed prints a line per rank when it builds its CPU
    communication op; shown with --verbose only."""
    import deepspeed

    backend = run.parallel.backend
    if backend == "auto":
        backend = "nccl" if device_type() == "cuda" else "gloo"
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=backend,
                                   timeout=timedelta(minutes=run.parallel.timeout_minutes))
    release_shm_buffer_names()
    adapter.use_current_collectives()


def apply_timeout_to_every_group(run: RunConfig) -> None:
    """parallel.timeout_minutes for every process group, not only the world group: DeepSpeed
    creates its expert, expert-data and data-parallel groups with torch's new_group and no
    timeout, which gives them torch's default (30 minutes on gloo, 10 on NCCL), so a peer
    whose network is gone would hang an all-to-all that long. Call once every group exists
    (after deepspeed.initialize)."""
    adapter.set_timeout_of_every_group(timedelta(minutes=run.parallel.timeout_minutes))


def choose_accelerator_quietly() -> None:
    """Without a GPU, tell DeepSpeed it is the CPU (it otherwise warns that it guessed so,
    on every rank). Call before DeepSpeed is imported; an explicit DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def release_shm_buffer_names() -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB) for every rank
    and never unlinks it, so each run leaves its buffers behind until /dev/shm is full and
    later runs fail. Every rank maps all its peers' buffers inside init_distributed; after
    the barrier the names can go (the mappings live on until the processes exit). Nothing
    to do on GPUs. Call right after deepspeed.init_distributed, on every rank."""
    import torch.distributed as dist

    dist.barrier()
    pattern = (f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ.get('MASTER_PORT')}_"
               f"{dist.get_rank()}")
    for path in Path("/dev/shm").glob(pattern):
        path.unlink(missing_ok=True)


def build_engine(run: RunConfig, model: nn.Module, ds_config: dict[str, Any],
                 lr_lambda: Callable[[int], float]):
    """deepspeed.initialize with our groups and a LambdaLR the engine steps (and saves in
    every checkpoint) at each gradient-accumulation boundary."""
    import deepspeed

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=engine_param_groups(model, run.train.weight_decay),
        config=ds_config, lr_scheduler=scheduler)
    return engine
