"""Checkpoints: DeepSpeed's save/load plus our client state, published atomically.

Layout under `<out_dir>/ckpt/`:
  step_000100/            DeepSpeed's files (model, ZeRO optimizer shards, LR scheduler)
                          + run_state_rank{r}.pt (per-rank RNG states and sampler position)
                          + module_pools_ep{e}_of_{E}.pt (the routed blocks' module pools:
                            weights and AdamW state by global module name, one file per
                            expert-parallel rank; see pool_files.py)
  latest                  the tag of the newest COMPLETE checkpoint

DeepSpeed writes `latest` itself with a plain open/write; we ask it not to, wait until
every rank has finished writing, then replace `latest` with os.replace (atomic on POSIX).
A process killed mid-write therefore leaves `latest` on the previous checkpoint, and the
half-written directory is ignored (and overwritten when that step is saved again).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def latest_tag(ckpt_dir: str | Path) -> Optional[str]:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, pools, ckpt_dir: str | Path, step: int, client_state: dict[str, Any],
         rank_state: dict[str, Any], keep: int) -> str:
    """Write checkpoint `step` on every rank, then publish it. Collective: all ranks call it."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state,
                           save_latest=False)
    if pools is not None:
        pools.save(ckpt_dir / tag)
    rank = dist.get_rank()
    torch.save({**rank_state, "rng": rng_state()},
               ckpt_dir / tag / f"run_state_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk before the checkpoint is published
    if rank == 0:
        _publish(ckpt_dir, tag)
        if keep:
            _prune(ckpt_dir, keep)
    dist.barrier()
    return tag


def _publish(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / LATEST)


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete complete checkpoints older than the newest `keep` (never the published one)."""
    current = latest_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name <= current)
    for old in tags[:-keep]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def load(engine, ckpt_dir: str | Path, pools=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the latest complete checkpoint into the engine (model, optimizer, schedule) and
    the expert-parallel pools (ModulePools, any E), and restore this rank's RNG. Returns
    (client_state, rank_state)."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt_dir} (no "
                                f"'{LATEST}' file). Fix: drop --resume to start fresh.")
    if pools is not None:  # first: it names an old-format checkpoint before DeepSpeed fails
        pools.load(ckpt_dir / tag)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rank_file = ckpt_dir / tag / f"run_state_rank{dist.get_rank()}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} is missing: the checkpoint was written with a "
                                f"different number of ranks. Fix: resume with the same world "
                                f"size.")
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return client_state, rank_state
