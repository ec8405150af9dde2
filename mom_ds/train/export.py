"""A trained model out of a DeepSpeed checkpoint, on one process, without DeepSpeed's
engine: used by mom-eval, mom-generate and mom-convert.

Accepts a run directory (`<out_dir>`), its `ckpt/` directory (latest complete tag) or one
tag directory. The checkpoint holds every parameter's fp32 weight whole (train/checkpoint.py),
whatever the ZeRO stage and the expert-parallel size, so nothing needs merging.
"""
from __future__ import annotations

from pathlib import Path
import torch

from ..config import RunConfig
from ..model import MoMForCausalLM
from .checkpoint import DENSE, latest_tag, read_tag


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoint directory, tag) for a run dir, a ckpt dir or a tag dir."""
    path = Path(path)
    for ckpt_dir in (path / "ckpt", path):
        tag = latest_tag(ckpt_dir)
        if tag is not None:
            return ckpt_dir, tag
    if (path / DENSE).is_file():
        return path.parent, path.name
    raise FileNotFoundError(f"{path} holds no complete checkpoint (no ckpt/latest, no latest, "
                            f"no {DENSE}). Fix: pass a run directory written by mom-train or "
                            f"one of its ckpt/step_* directories.")


def consolidated_state_dict(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor], int]:
    """(the run's config, fp32 state dict of the whole model, step)."""
    ckpt_dir, tag = resolve(path)
    client, params = read_tag(ckpt_dir / tag)
    weights = {name: entry["weight"].float() for name, entry in params.items()}
    return RunConfig.from_dict(client["config"]), weights, int(client["step"])


def load_model(path: str | Path) -> tuple[RunConfig, MoMForCausalLM, int]:
    run, weights, step = consolidated_state_dict(path)
    model = MoMForCausalLM(run.model)
    model.load_state_dict(weights)
    return run, model.eval(), step
