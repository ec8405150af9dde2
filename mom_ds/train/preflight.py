"""Checks that need files but no processes: run on every rank before the process group
starts, so a bad run stops with one clear message instead of a hang or a stack per rank."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import ConfigError, RunConfig, load_deepspeed_json
from ..parallel.placement import sharded_pools, validate_expert_parallel
from ..parallel.process_group import device_type, world_size_from_env
from .engine import build_ds_config
from .profiling import PROFILE_DIR
from . import wandb_sink
from .run_lock import RunLock


def check_data(run: RunConfig, world_size: int) -> None:
    """Both splits open (files present, sizes match meta.json), hold a window for every rank,
    and use no token id the model cannot embed."""
    from ..data import DataError, TokenizedDataset
    data_dir = Path(run.data.data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"data.data_dir = {str(data_dir)!r} does not exist. Fix: run "
                          f"`mom-prep --source builtin --tokenizer bytes --out {data_dir}` "
                          f"or point data.data_dir at mom-prep's output.")
    for split in ("train", "val"):
        try:
            data = TokenizedDataset(data_dir, split=split, seq_len=run.data.seq_len)
        except DataError as err:
            raise ConfigError(f"data.data_dir = {str(data_dir)!r}: {err}") from None
        if data.vocab_size > run.model.vocab_size:
            raise ConfigError(f"the data in {data_dir} uses a vocabulary of {data.vocab_size} "
                              f"tokens but model.vocab_size = {run.model.vocab_size}. Fix: set "
                              f"model.vocab_size >= {data.vocab_size} (e.g. --model.vocab_size "
                              f"{data.vocab_size}), or leave it unset to take the data's.")
        sample_windows(data)
        if len(data) < world_size:
            raise ConfigError(f"{split}.bin in {data_dir} holds {len(data)} windows of "
                              f"data.seq_len = {run.data.seq_len} tokens, fewer than the "
                              f"{world_size} ranks. Fix: more data or a shorter data.seq_len.")


def sample_windows(data, n: int = 64) -> None:
    """Read n windows spread over the split (each is checked against the vocabulary as it is
    read): a file whose ids or meta.json are wrong fails here, before any process group,
    without reading the whole file."""
    for i in range(0, len(data), max(1, len(data) // n)):
        data[i]


def check_expert_clipping(run: RunConfig, ds_config: dict[str, Any]) -> None:
    """DeepSpeed 0.19 clips at ZeRO stage 0 with the mean of the ranks' gradient norms
    (runtime/utils.py, clip_grad_norm_), which is not the global norm when the ranks hold
    different modules; ZeRO stages 1 to 3 compute it right (README, "Expert parallelism")."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    ep_size = run.parallel.expert_parallel_size
    if stage == 0 and run.train.grad_clip > 0 and sharded_pools(run.model, ep_size):
        raise ConfigError(
            f"{run.parallel.deepspeed}: ZeRO stage 0 with parallel.expert_parallel_size "
            f"{ep_size} and train.grad_clip {run.train.grad_clip}: DeepSpeed clips at stage 0 "
            f"with the mean of the ranks' gradient norms, not the global norm of the sharded "
            f"module pools. Fix: use ZeRO stage 1, 2 or 3 (--deepspeed ds_configs/zero1.json), "
            f"or train.grad_clip 0.")


# What a run writes into train.out_dir (a fresh run refuses to mix with them; --overwrite
# removes them; a fresh start after a failed attempt sets them aside)
RUN_FILES = ("ckpt", "tb", "metrics.jsonl", "config.yaml", PROFILE_DIR, wandb_sink.ID_FILE,
             wandb_sink.LOCAL_DIR)


def check_writable(directory: Path) -> None:
    """The run directory can be created and written (checked with a file of our own)."""
    probe = directory / f".mom-write-check-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train.out_dir = {str(directory)!r} is not writable ({err.strerror}). "
                          f"Fix: choose a directory this user can write, on a file system "
                          f"every rank sees.") from None


def check_run_dir(run: RunConfig, resume: bool, overwrite: bool) -> None:
    """One run per directory: rank 0 takes train.out_dir's lock before anything is written
    there (run_lock.py; a live holder is named and refused, --overwrite included), and
    keeps it until the process ends. A fresh run never silently replaces another: without
    --resume or --overwrite, train.out_dir must hold no run. And the directory must be
    writable (every rank checks: a rank on another node may see another file system)."""
    out = Path(run.train.out_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other. Fix: --resume to "
                          "continue the run in train.out_dir, --overwrite to replace it.")
    check_writable(out)
    if os.environ.get("RANK", "0") != "0":
        check_run_files(out, resume or overwrite)
        return
    lock = RunLock(out)
    warning = lock.acquire()
    try:
        check_run_files(out, resume or overwrite)
    except BaseException:
        lock.release()
        raise
    if warning:
        print(f"mom-train: warning: {warning}", file=sys.stderr, flush=True)


def check_run_files(out: Path, continues: bool) -> None:
    found = [name for name in RUN_FILES if (out / name).exists()]
    if continues or not found:
        return
    latest = out / "ckpt" / "latest"
    what = f"checkpoint {latest.read_text().strip()}" if latest.is_file() else ", ".join(found)
    raise ConfigError(f"train.out_dir = {str(out)!r} already holds a run ({what}). Fix: "
                      f"--resume to continue it, --overwrite to replace it, or another "
                      f"--train.out_dir.")


def preflight(run: RunConfig) -> dict[str, Any]:
    """Every check before DeepSpeed starts; returns the completed DeepSpeed config."""
    world_size = world_size_from_env()
    validate_expert_parallel(world_size, run.parallel.expert_parallel_size)
    check_data(run, world_size)
    ds_config = build_ds_config(run, load_deepspeed_json(run.parallel.deepspeed), world_size,
                                device_type())
    check_expert_clipping(run, ds_config)
    wandb_sink.check(run.train.wandb_project)
    return ds_config


@dataclass
class StartCheck:
    """The outcome of this rank's start-up checks: their result, or the error (a bad-input
    error, see mom_ds/errors.py) that agreement.agree() raises on every rank once the
    process group is up."""
    result: Any = None
    error: Optional[str] = None

    @classmethod
    def of(cls, checks: Callable[[], Any], is_bad_input: Callable[[BaseException], bool],
           world_size: int) -> "StartCheck":
        """Run the checks. Alone, an error is raised at once; as one of several ranks it is
        kept for agree()."""
        try:
            return cls(result=checks())
        except Exception as err:  # noqa: BLE001 - re-raised unless it is bad input
            if world_size == 1 or not is_bad_input(err):
                raise
            return cls(error=str(err))
