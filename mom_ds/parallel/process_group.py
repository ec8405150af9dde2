"""The process group: the one place it is started (mom-train, mom-eval, mom-generate and the
multi-rank tests call `start`), and the timeout every group gets.

Every launcher we support (deepspeed, torchrun, srun and mpirun through launch/) exports
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, or lets DeepSpeed discover them from MPI;
`start` is DeepSpeed's init_distributed with our backend choice and timeout, so DeepSpeed's
own communication layer (which its engine and MoE groups use) is the one torch's is.
"""
from __future__ import annotations

import contextlib
import io
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .. import engine_adapter as adapter


def world_size_from_env() -> int:
    """Ranks this run will have, known before the process group starts (every launcher
    we support exports WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def choose_accelerator_quietly() -> None:
    """Without a GPU, tell DeepSpeed it is the CPU (it otherwise warns that it guessed so,
    on every rank). Call before DeepSpeed is imported; an explicit DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def device_type() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def start(backend: str, timeout: timedelta, verbose: bool = False) -> None:
    """Start the process group (parallel.backend: auto is nccl on CUDA, gloo on CPU) with
    parallel.timeout_minutes as `timeout`. DeepSpeed prints a line per rank when it builds its CPU
    communication op; shown with verbose only."""
    import deepspeed

    if backend == "auto":
        backend = "nccl" if device_type() == "cuda" else "gloo"
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=backend, verbose=verbose,
                                   timeout=timeout)
    release_shm_buffer_names()
    adapter.use_current_collectives()


def apply_timeout_to_every_group(timeout: timedelta) -> None:
    """parallel.timeout_minutes for every process group, not only the world group: DeepSpeed
    creates its expert, expert-data and data-parallel groups with torch's new_group and no
    timeout, which gives them torch's default (30 minutes on gloo, 10 on NCCL), so a peer
    whose network is gone would hang an all-to-all that long. Call once every group exists
    (after deepspeed.initialize, or after parallelize where there is no engine)."""
    adapter.set_timeout_of_every_group(timeout)


def release_shm_buffer_names() -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB) for every rank
    and never unlinks it, so each run leaves its buffers behind until /dev/shm is full and
    later runs fail. Every rank maps all its peers' buffers inside init_distributed; after
    the barrier the names can go (the mappings live on until the processes exit). Nothing
    to do on GPUs."""
    dist.barrier()
    pattern = (f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ.get('MASTER_PORT')}_"
               f"{dist.get_rank()}")
    for path in Path("/dev/shm").glob(pattern):
        path.unlink(missing_ok=True)
