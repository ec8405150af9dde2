"""A trained model out of a mom-train checkpoint, on one process, without DeepSpeed: used by
mom-eval, mom-generate, mom-convert, mom-assemble and the harness.

Accepts a run directory (`<out_dir>`), its `ckpt/` directory (latest complete tag) or one
tag directory. The checkpoint holds every parameter's fp32 weight whole (format.py),
whatever the ZeRO stage and the expert-parallel size, so nothing needs merging.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..config import RunConfig, with_overrides
from ..model import ConfigError, MoMConfig, MoMForCausalLM
from .format import DENSE, choose_tag, read_tag, verify_tag
from .published import LATEST


def resolve(path: str | Path) -> tuple[Path, str]:
    """(checkpoint directory, tag) for a run dir, a ckpt dir or a tag dir."""
    path = Path(path)
    for ckpt_dir in (path / "ckpt", path):
        if (ckpt_dir / LATEST).is_file() or any(ckpt_dir.glob("step_*")):
            tag, warning = choose_tag(ckpt_dir)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
            return ckpt_dir, tag
    if (path / DENSE).is_file():
        verify_tag(path)
        return path.parent, path.name
    raise FileNotFoundError(f"{path} holds no complete checkpoint (no ckpt/latest, no latest, "
                            f"no {DENSE}). Fix: pass a run directory written by mom-train or "
                            f"one of its ckpt/step_* directories.")


def consolidated_state_dict(path: str | Path
                            ) -> tuple[RunConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(the run's config, fp32 state dict of the whole model, the checkpoint's client state:
    step, world size, ...)."""
    ckpt_dir, tag = resolve(path)
    client, params = read_tag(ckpt_dir / tag)
    weights = {name: entry["weight"].float() for name, entry in params.items()}
    return RunConfig.from_dict(client["config"]), weights, client


def require_whole_model(run: RunConfig, path: str | Path) -> None:
    """A modular run holds only its modules; the tools that want a model say what to do."""
    if run.modular.enabled:
        raise ConfigError(f"{path} is a modular run: its checkpoints hold the modules, not a "
                          f"model. Fix: mom-assemble {path} --ratio R writes a model for a "
                          f"compression ratio (mom-assemble {path} --list shows them).")


def with_compute(config: MoMConfig, depth: Optional[int] = None,
                 top_k: Optional[int] = None) -> MoMConfig:
    """The same weights run with another number of routing steps H' or modules per step K'
    (compute chosen at inference): no parameter depends on H or K, so a trained MoM's state
    dict loads into the changed model. A GRU router simply runs H' steps."""
    if depth is None and top_k is None:
        return config
    if not config.n_routed_blocks:
        raise ConfigError("--depth / --top-k-modules change the routed blocks, but this model "
                          "has none (model.n_routed_blocks = 0). Fix: drop them, or evaluate a "
                          "MoM checkpoint.")
    changed = {"depth": depth, "top_k": top_k}
    try:
        return dataclasses.replace(config, **{k: v for k, v in changed.items() if v is not None})
    except ConfigError as err:
        raise ConfigError(f"--depth {depth} / --top-k-modules {top_k}: {err}") from None


def load_model(path: str | Path, depth: Optional[int] = None, top_k: Optional[int] = None,
               overrides: Sequence[str] = (),
               shard: Optional[Callable[[MoMForCausalLM, RunConfig], None]] = None
               ) -> tuple[RunConfig, MoMForCausalLM, dict[str, Any]]:
    """(config, model, client state) of a checkpoint, the model on one process in eval mode,
    optionally with H' routing steps and K' modules per step (with_compute) and the
    checkpoint's config changed by `--section.key VALUE` overrides; run then describes the
    changed model. An override that changes a weight's shape is a ConfigError.

    shard(model, run): applied to the model while it is still on the meta device (no
    memory), e.g. parallelize's expert parallelism; each parameter is then taken from the
    memory-mapped checkpoint as the sharded model holds it (a sharded pool: this rank's
    modules only), so a process never holds the whole model."""
    run, weights, client = consolidated_state_dict(path)
    require_whole_model(run, path)
    run = with_overrides(run, overrides)
    run.model = with_compute(run.model, depth, top_k)
    try:
        if shard is None:
            model = MoMForCausalLM(run.model)
            model.load_state_dict(weights)
        else:
            with torch.device("meta"):
                model = MoMForCausalLM(run.model)
            shard(model, run)
            model.load_state_dict(held_parts(model, weights), assign=True)
    except RuntimeError as err:
        if not overrides:
            raise
        problem = str(err).splitlines()[1].strip().rstrip(".")  # the first mismatch
        raise ConfigError(f"{' '.join(overrides)}: the checkpoint's weights do not fit the "
                          f"changed model ({problem}). Fix: override only what leaves the "
                          f"weights as trained (e.g. --model.depth, --model.top_k, "
                          f"--model.temperature).") from None
    return run, model.eval(), client


def held_parts(model: torch.nn.Module, weights: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Each of the (sharded) model's tensors out of the whole ones: a pool that sharding cut
    to some of its modules (its `placement`) takes those rows, everything else is whole."""
    held = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        whole = weights.get(name)
        owner = model.get_submodule(name.rsplit(".", 2)[0]) if name.count(".") >= 2 else None
        placement = getattr(owner, "placement", None)
        if whole is not None and placement is not None and tensor.shape != whole.shape:
            whole = whole[placement.owned()]
        if whole is not None:  # a missing one is load_state_dict's error, named
            held[name] = whole
    return held
