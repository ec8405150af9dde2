"""A trained model out of a DeepSpeed checkpoint, on one process, without DeepSpeed's
engine: used by mom-eval, mom-generate and mom-convert.

Accepts a run directory (`<out_dir>`), its `ckpt/` directory (latest complete tag) or one
tag directory. ZeRO shards (stages 1 to 3) are merged by DeepSpeed's own zero_to_fp32 into
the fp32 master weights (stage 0 checkpoints hold them already); the routed blocks' module
pools come from their own files (pool_files.py), whatever the expert-parallel size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..model import MoMForCausalLM
from .checkpoint import latest_tag
from . import pool_files

MODEL_STATES = "mp_rank_00_model_states.pt"


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoint directory, tag) for a run dir, a ckpt dir or a tag dir."""
    path = Path(path)
    for ckpt_dir in (path / "ckpt", path):
        tag = latest_tag(ckpt_dir)
        if tag is not None:
            return ckpt_dir, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"{path} holds no complete checkpoint (no ckpt/latest, no latest, "
                            f"no *model_states.pt). Fix: pass a run directory written by "
                            f"mom-train or one of its ckpt/step_* directories.")


def _client_state(tag_dir: Path) -> dict[str, Any]:
    # ZeRO-3 names the file per data-parallel rank; rank 0 holds the client state too.
    for name in (MODEL_STATES, "zero_pp_rank_0_" + MODEL_STATES):
        if (tag_dir / name).is_file():
            return torch.load(tag_dir / name, map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"{tag_dir} has no {MODEL_STATES}: not a DeepSpeed checkpoint")


def consolidated_state_dict(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor], int]:
    """(the run's config, fp32 state dict of the whole model, step)."""
    ckpt_dir, tag = resolve(path)
    states = _client_state(ckpt_dir / tag)
    run = RunConfig.from_dict(states["config"])
    if any((ckpt_dir / tag).glob("*optim_states.pt")) and states.get("ds_config", {}).get(
            "zero_optimization", {}).get("stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        weights = states["module"]
    weights = {**weights, **pool_files.read_weights(ckpt_dir / tag)}  # the module pools' own files
    weights = {k: v.float() for k, v in weights.items()}
    return run, weights, int(states["step"])


def load_model(path: str | Path) -> tuple[RunConfig, MoMForCausalLM, int]:
    run, weights, step = consolidated_state_dict(path)
    model = MoMForCausalLM(run.model)
    model.load_state_dict(weights)
    return run, model.eval(), step
