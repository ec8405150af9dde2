"""The optimizer configuration, all from train.*: AdamW (the DeepSpeed JSON's optimizer
block) and its learning-rate schedule (linear warmup, then cosine). The parameter groups
it steps come from parallelize (parallel/parallelize.py), which knows which parameters are
experts; the engine steps both at each gradient-accumulation boundary."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..config import ConfigError, RunConfig, TrainConfig


def lr_factor(step: int, t: TrainConfig) -> float:
    """Multiplier of train.lr for optimizer step `step` (0-based): linear warmup, then
    cosine down to min_lr at max_steps (nanoGPT's get_lr). A pure function of the step,
    so a resumed run follows the same schedule."""
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (t.min_lr + cosine * (t.lr - t.min_lr)) / t.lr


def scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig
              ) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as the LambdaLR the engine steps and saves in every checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))


def adamw_block(run: RunConfig, device: str, offload: bool) -> dict[str, Any]:
    """The DeepSpeed optimizer block: AdamW with train.*'s settings."""
    t = run.train
    params = {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
              "weight_decay": t.weight_decay}
    if not offload:  # offload runs DeepSpeedCPUAdam
        # DeepSpeed's FusedAdam needs a CUDA build; elsewhere torch's AdamW is the same math.
        params["torch_adam"] = device != "cuda"
    return {"type": "AdamW", "params": params}


def check_optimizer_block(block: Any, run: RunConfig, where: str) -> None:
    """An optimizer block may stay in a DeepSpeed JSON (a Trainer JSON has one, often all
    "auto") if it asks for what mom-train builds anyway: AdamW with train.*'s settings."""
    if block is None:
        return
    recipe = adamw_block(run, "cuda", offload=True)["params"]
    differs = [f"type {block.get('type')!r}"] if str(block.get("type")).lower() != "adamw" \
        else []
    differs += [f"params.{key} = {value!r}" + (f" but the recipe gives {recipe[key]!r}"
                                               if key in recipe else " (not from train.*)")
                for key, value in block.get("params", {}).items() if recipe.get(key) != value]
    if differs:
        raise ConfigError(f"{where} has an 'optimizer' block ({'; '.join(differs)}). Fix: "
                          f"remove it; mom-train builds AdamW from train.* (a block of AdamW "
                          f"with \"auto\" params is accepted).")


def check_no_scheduler_block(ds_json: Any, where: str) -> None:
    """The schedule is train.*'s; a JSON naming another one is refused."""
    if isinstance(ds_json, dict) and "scheduler" in ds_json:
        raise ConfigError(f"{where} has a 'scheduler' block. Fix: remove it; mom-train builds "
                          f"the warmup + cosine schedule from train.* (a Trainer block of "
                          f"\"auto\" values still names another schedule in its type).")
