"""One training run from a checked RunConfig: process group, model, engine, data, resume,
then the loop. (The checks that must come first live in preflight.py.)"""
from __future__ import annotations

import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import engine_adapter as adapter
from ..checkpoints.format import choose_tag, read_client
from ..config import RunConfig
from ..errors import BAD_INPUT, exit_code
from ..model import MoMForCausalLM
from ..model.contract import TrainableLM
from ..parallel import process_group
from ..parallel.parallelize import parallelize
from ..parallel.placement import describe_placement
from . import checkpoint, run_lock
from .agreement import agree, check_shared_storage
from .batches import Batches
from .engine import build_engine
from .loop import Progress, train, write_config
from .monitor import Monitor
from .peers import describe, gather_peers, is_peer_failure, lost_rank_error
from .preflight import StartCheck
from .resume_rules import check_resume
from .run_data import data_fingerprint, save_run_tokenizer
from ..evaluation import validation_windows


def run_training(run: RunConfig, start: StartCheck, **options: Any) -> dict[str, float]:
    """The run (see _run_training for the options); the lock on train.out_dir that rank 0
    took in preflight is released however it ends, also when a caller runs several in one
    process."""
    try:
        return _run_training(run, start, **options)
    finally:
        run_lock.release_all()


def _run_training(run: RunConfig, start: StartCheck, resume: bool = False,
                  stop_after: Optional[int] = None, overwrite: bool = False,
                  resume_from: Optional[str] = None, verbose: bool = False,
                  allow_data_change: bool = False,
                  build: Optional[Callable[[RunConfig, bool], TrainableLM]] = None
                  ) -> dict[str, float]:
    """build(run, resume): the model to train, build_model's by default (mom-train passes
    the modular student's builder for a modular run)."""
    from ..data import TokenizedDataset, WindowSampler

    timeout = timedelta(minutes=run.parallel.timeout_minutes)
    process_group.start(run.parallel.backend, timeout, verbose)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and (warning := adapter.version_warning()):
        print(f"mom-train: {warning}", file=sys.stderr, flush=True)
    peers = gather_peers()
    ds_config = agree(start, peers)  # a rank's failed start-up check, on every rank
    # what the checkpoints record, and what the ranks compare: the same data on every node
    run.data.fingerprint = data_fingerprint(run.data.data_dir)
    if world > 1:
        check_shared_storage(run, peers)
    out_dir = Path(run.train.out_dir)
    if overwrite and rank == 0:
        remove_run(out_dir)
    dist.barrier()
    # recorded absolute, so mom-eval & co. find the data from any working directory
    run.data.data_dir = str(Path(run.data.data_dir).resolve())
    torch.manual_seed(run.train.seed)  # same initial weights on every rank
    model = (build or build_model)(run, resume)
    n_params = model.num_params()  # before sharding and ZeRO-3 partitioning
    if resume:
        tag, warning = choose_tag(out_dir / "ckpt", resume_from)
        if warning and rank == 0:
            print(f"mom-train: warning: {warning}", file=sys.stderr, flush=True)
        # agreed on: a rank that refused alone (other data on its node) would leave the
        # others waiting in the engine's collectives until the timeout
        agree(StartCheck.of(lambda: check_config(run, out_dir / "ckpt" / tag,
                                                 allow_data_change, rank == 0),
                            is_bad_input, world), peers)
    ep_size = run.parallel.expert_parallel_size
    layout = parallelize(model, run)
    engine = build_engine(run, model, layout, ds_config)
    process_group.apply_timeout_to_every_group(timeout)
    device = engine.device
    torch.manual_seed(run.train.seed + rank)  # from here on (dropout) ranks draw differently

    def batches(split: str, seed: int) -> Batches:
        data = TokenizedDataset(run.data.data_dir, split=split, seq_len=run.data.seq_len)
        sampler = WindowSampler(len(data), seed=seed, rank=rank, world_size=world)
        return Batches(data, sampler, run.train.micro_batch_size, device)

    train_batches = batches("train", run.data.seed)
    progress = Progress()
    if resume:
        client = checkpoint.load(engine, model, layout, out_dir / "ckpt", tag)
        progress = Progress(step=client["step"], tokens_seen=client["tokens_seen"],
                            health=client.get("health", {}))
        train_batches.load_state_dict(client["sampler"])
        if rank == 0:
            print(f"resumed from step {progress.step} ({progress.tokens_seen} tokens, saved "
                  f"by {client['world_size']} rank(s) at expert_parallel_size "
                  f"{client['expert_parallel_size']})", flush=True)
    if rank == 0:  # after the resume's checks: a refused resume leaves the directory as it was
        save_run_tokenizer(run.data.data_dir, out_dir)
        if progress.step == 0:  # else config.yaml is the checkpoint's until the next one
            write_config(run, out_dir)  # the exact config, overrides included
    monitor = Monitor(out_dir, enabled=rank == 0, resumed_step=progress.step,
                      wandb_project=run.train.wandb_project)
    monitor.started(progress.step, run.to_dict())
    if rank == 0:
        if world > 1:
            print(describe(peers), flush=True)
        trained = "trained (modules) " if run.modular.enabled else ""
        print(f"model: {n_params / 1e6:.2f}M {trained}parameters; run dir {out_dir}; "
              f"TensorBoard: tensorboard --logdir {out_dir / 'tb'}", flush=True)
        if run.model.n_routed_blocks:
            print(describe_placement(run.model, ep_size), flush=True)
        if layout.compiled:
            print(f"torch.compile: {layout.compiled} parts (vanilla and MoD layers, routed blocks "
                  f"with local pools, routers); the first steps include their compilation",
                  flush=True)
    try:
        # the validation windows (evaluation.py): every evaluation scores the same tokens
        val = validation_windows(TokenizedDataset(run.data.data_dir, split="val",
                                                  seq_len=run.data.seq_len),
                                 run.train.eval_batches, run.train.micro_batch_size, world)
        return train(run, engine, model, layout, train_batches, val,
                     progress, monitor, stop_after)
    except Exception as err:
        if world > 1 and is_peer_failure(err):
            raise lost_rank_error(err, peers, rank, progress.step, out_dir / "ckpt") from None
        raise
    finally:
        monitor.close()


def remove_run(out_dir: Path) -> None:
    """What --overwrite replaces: the files a run writes, nothing else in the directory."""
    from .preflight import RUN_FILES

    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def build_model(run: RunConfig, resume: bool) -> TrainableLM:
    """The model to train when the caller names no other: a MoMForCausalLM, from
    train.init_from's weights on a fresh start."""
    model = MoMForCausalLM(run.model)
    if run.train.init_from and not resume:
        load_initial_weights(model, run.train.init_from)
    return model


def is_bad_input(err: BaseException) -> bool:
    """An error the ranks agree on (agreement.agree): bad input, exit 2."""
    return exit_code(err) == BAD_INPUT


def check_config(run: RunConfig, tag_dir: Path, allow_data_change: bool, report: bool) -> None:
    """The resume's config against the checkpoint's, field by field (resume_rules.RULES),
    before the engine is built. Rank 0 says what is applied from the resume step on."""
    client = read_client(tag_dir)
    applied, warnings = check_resume(run, client["config"], int(client["step"]),
                                     allow_data_change)
    if report:
        for warning in warnings:
            print(f"mom-train: warning: {warning}", file=sys.stderr, flush=True)
        if applied:
            print(f"resuming with a changed config, applied from step {client['step'] + 1}: "
                  f"{', '.join(applied)}", flush=True)


def load_initial_weights(model: MoMForCausalLM, path: str) -> None:
    """Weights written by mom-convert; every tensor must match the run's model."""
    from ..model.weights_file import load_weights

    saved = load_weights(path, "train.init_from")
    try:
        model.load_state_dict(saved.state_dict)
    except RuntimeError as err:
        raise ValueError(f"train.init_from = {path!r} does not fit this run's model (it was "
                         f"made for {saved.model_config}): {err}. Fix: convert with this "
                         f"recipe's --config.") from None
