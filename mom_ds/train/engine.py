"""The DeepSpeed engine: the completed DeepSpeed config and `deepspeed.initialize` over the
parameter groups of parallel/parallelize.py, with the optimizer and schedule of
optimizer.py.

`build_ds_config` runs before any process group exists: it fills the batch sizes, the
gradient clipping, the optimizer and the precision from the RunConfig, and refuses a JSON
that disagrees with them, so a mismatch is one clear error instead of a failure inside
DeepSpeed on every rank.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..parallel.parallelize import ParallelLayout
from .ds_schema import auto_values, check_deepspeed_json, resolve_auto
from .optimizer import adamw_block, check_no_scheduler_block, check_optimizer_block, scheduler


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
    check_no_scheduler_block(ds_json, where)
    wanted = {"train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": t.grad_accum_steps,
              "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
              "gradient_clipping": t.grad_clip}
    bf16 = use_bf16(run, device)
    ds_json = resolve_auto(ds_json, auto_values(run, wanted, bf16), where)
    check_deepspeed_json(ds_json, where)
    cfg = copy.deepcopy(ds_json)
    check_optimizer_block(cfg.pop("optimizer", None), run, where)
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
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    cfg["optimizer"] = adamw_block(run, device, offload not in (None, "none"))
    cfg.setdefault("steps_per_print", 10 ** 9)  # our loop prints; keep DeepSpeed quiet
    return cfg


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


def build_engine(run: RunConfig, model: nn.Module, layout: ParallelLayout,
                 ds_config: dict[str, Any]):
    """deepspeed.initialize over parallelize's parameter groups, with the schedule the engine
    steps (and saves in every checkpoint) at each gradient-accumulation boundary."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=layout.param_groups, config=ds_config,
        lr_scheduler=lambda optimizer: scheduler(optimizer, run.train))
    return engine
