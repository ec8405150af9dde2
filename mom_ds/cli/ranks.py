"""mom-eval and mom-generate on the ranks a launcher started (torchrun, the deepspeed
launcher, srun): a model too big for one process runs with its module pools sharded over
the ranks (expert parallelism), through the same `parallelize` and process-group start as
training. One process (no WORLD_SIZE, or 1) starts no process group.

On several ranks the model is built on the meta device, sharded there, and only then given
its weights from the memory-mapped checkpoint (checkpoints/loading.py): a rank holds the
dense weights and its own 1/E of each sharded pool, never the whole model (a checkpoint
written with expert parallelism has its pool slices joined in host memory first). Every
rank runs the same forward calls (the all-to-all needs all of them) and rank 0 prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..checkpoints.loading import load_model
from ..config import ConfigError, ParallelConfig, RunConfig
from ..model import MoMForCausalLM
from ..parallel import process_group
from ..parallel.parallelize import parallelize
from .args import device as named_device


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    expert_parallel_size: int

    @property
    def printing(self) -> bool:
        return self.rank == 0


def open_ranks(command: str, expert_parallel_size: Optional[int]) -> Ranks:
    """This process's place: one process, or a rank of the launcher's job with the process
    group started (parallel.* defaults; each group gets the run's timeout once it is
    known, in load_on_ranks). Checked before anything is loaded."""
    world = process_group.world_size_from_env()
    if world == 1:
        if expert_parallel_size not in (None, 1):
            raise ConfigError(f"--expert-parallel-size {expert_parallel_size} needs "
                              f"that many ranks, and this is one process. Fix: launch it on "
                              f"several, e.g. torchrun --nproc-per-node "
                              f"{expert_parallel_size} -m mom_ds.cli.{command[4:]} ...")
        return Ranks(0, 1, 1)
    ep_size = expert_parallel_size or world
    if world % ep_size:
        raise ConfigError(f"--expert-parallel-size {ep_size} does not divide the "
                          f"{world} ranks. Fix: a divisor of {world}.")
    process_group.choose_accelerator_quietly()
    defaults = ParallelConfig()
    process_group.start(defaults.backend, timedelta(minutes=defaults.timeout_minutes))
    return Ranks(dist.get_rank(), world, ep_size)


def load_on_ranks(ranks: Ranks, path: str, depth: Optional[int], top_k: Optional[int],
                  overrides: Sequence[str], device_name: str
                  ) -> tuple[RunConfig, MoMForCausalLM, dict[str, Any], torch.device]:
    """(config, model, client state, device): the checkpoint's model through
    parallelize(model, run, training=False), on this rank's device."""
    def shard(model: MoMForCausalLM, run: RunConfig) -> None:
        run.parallel.expert_parallel_size = ranks.expert_parallel_size
        parallelize(model, run, training=False)

    run, model, client = load_model(path, depth, top_k, overrides,
                                    shard if ranks.world_size > 1 else None)
    where = named_device(device_name)
    if ranks.world_size == 1:
        parallelize(model, run, training=False)  # one process: nothing to shard
    else:
        process_group.apply_timeout_to_every_group(
            timedelta(minutes=run.parallel.timeout_minutes))
        if where.type == "cuda" and where.index is None:
            where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return run, model.to(where), client, where


def close_ranks(ranks: Ranks) -> None:
    """End the process group a launcher's ranks started (nothing for one process)."""
    if ranks.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
