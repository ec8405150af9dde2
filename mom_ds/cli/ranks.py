"""mom-eval and mom-generate on the ranks a launcher started (torchrun, the deepspeed
launcher, srun): a model too big for one process runs with its module pools sharded over
the ranks (expert parallelism), through the same `parallelize` and process group as
training. One process (no WORLD_SIZE, or 1) stays as it was: no process group.

Every rank builds the whole model from the checkpoint in host memory (its files are read
memory-mapped), keeps its own modules, and only then moves to its device: on the device a
rank holds the dense weights and 1/E of each sharded pool (the host's peak is one whole
fp32 model per rank, while loading). Every rank runs the same forward calls (the all-to-all
needs all of them) and rank 0 prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..parallel import process_group
from ..parallel.parallelize import parallelize
from .args import device as named_device


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device

    @property
    def printing(self) -> bool:
        return self.rank == 0


def place(command: str, run: RunConfig, model: nn.Module, device_name: str,
          expert_parallel_size: Optional[int]) -> Ranks:
    """Put `model` (built whole by the loader, in eval mode) on this process's device and,
    under a launcher, on its ranks: the process group started, the pools sharded over E
    ranks (--expert-parallel-size; default: every rank). run.parallel records E."""
    world = process_group.world_size_from_env()
    if world == 1:
        if expert_parallel_size not in (None, 1):
            raise ConfigError(f"--expert-parallel-size {expert_parallel_size} needs "
                              f"that many ranks, and this is one process. Fix: launch it on "
                              f"several, e.g. torchrun --nproc-per-node "
                              f"{expert_parallel_size} -m mom_ds.cli.{command[4:]} ...")
        parallelize(model, run, training=False)  # one process: nothing to shard
        where = named_device(device_name)
        model.to(where)
        return Ranks(0, 1, where)
    ep_size = expert_parallel_size or world
    if world % ep_size:
        raise ConfigError(f"--expert-parallel-size {ep_size} does not divide the "
                          f"{world} ranks. Fix: a divisor of {world}.")
    process_group.choose_accelerator_quietly()
    timeout = timedelta(minutes=run.parallel.timeout_minutes)
    process_group.start(run.parallel.backend, timeout)
    run.parallel.expert_parallel_size = ep_size
    parallelize(model, run, training=False)  # before .to(): only this rank's modules move
    process_group.apply_timeout_to_every_group(timeout)
    import torch.distributed as dist

    where = named_device(device_name)
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model.to(where)
    return Ranks(dist.get_rank(), world, where)


def stop(ranks: Ranks) -> None:
    """End the process group a launcher's ranks started (nothing for one process)."""
    if ranks.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
