"""One training run from a checked RunConfig: process group, model, engine, data, resume,
then the loop. (The checks that must come first live in preflight.py.)"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import RunConfig
from ..model import MoMForCausalLM
from ..parallel.expert import apply_expert_parallel, use_global_balance_stats
from . import checkpoint
from .batches import Batches
from .engine import build_engine, init_distributed
from .module_pools import ModulePools, detach_pools
from .loop import Progress, lr_factor, train
from .monitor import Monitor


def run_training(run: RunConfig, ds_config: dict[str, Any], resume: bool = False,
                 stop_after: Optional[int] = None) -> dict[str, float]:
    from ..data import TokenizedDataset, WindowSampler

    init_distributed(run)
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(run.train.out_dir)
    if rank == 0:
        run.save(out_dir / "config.yaml")  # the exact config, overrides included
    torch.manual_seed(run.train.seed)  # same initial weights on every rank
    model = MoMForCausalLM(run.model)
    if run.train.init_from and not resume:
        load_initial_weights(model, run.train.init_from)
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters
    ep_size = run.parallel.expert_parallel_size
    pools_holder = parallelize(model, ep_size, world)
    engine = build_engine(run, model, ds_config, lambda s: lr_factor(s, run.train))
    pools = ModulePools(pools_holder, engine, run, ep_size) if pools_holder is not None else None
    device = engine.device
    torch.manual_seed(run.train.seed + rank)  # from here on (dropout) ranks draw differently

    def batches(split: str, seed: int) -> Batches:
        data = TokenizedDataset(run.data.data_dir, split=split, seq_len=run.data.seq_len)
        sampler = WindowSampler(len(data), seed=seed, rank=rank, world_size=world)
        return Batches(data, sampler, run.train.micro_batch_size, device)

    train_batches = batches("train", run.data.seed)
    progress = Progress()
    if resume:
        client, rank_state = checkpoint.load(engine, out_dir / "ckpt", pools)
        progress = Progress(step=client["step"], tokens_seen=client["tokens_seen"])
        train_batches.load_state_dict(rank_state["sampler"])
        if rank == 0:
            print(f"resumed from step {progress.step} ({progress.tokens_seen} tokens)",
                  flush=True)
    monitor = Monitor(out_dir, enabled=rank == 0)
    if rank == 0:
        print(f"model: {n_params / 1e6:.2f}M parameters; run dir {out_dir}; "
              f"TensorBoard: tensorboard --logdir {out_dir / 'tb'}", flush=True)
        if pools is not None:
            held = sum(p.numel() for p in pools.holder.parameters())
            print(f"module pools: {held / 1e6:.2f}M parameters held by each rank "
                  f"(expert_parallel_size {ep_size}: 1/{ep_size} of every pool)", flush=True)
    try:
        # val windows: a fixed seed so every evaluation scores the same tokens
        return train(run, engine, pools, train_batches, lambda: batches("val", 0), progress,
                     monitor, stop_after)
    finally:
        monitor.close()


def parallelize(model: MoMForCausalLM, ep_size: int, world: int) -> Optional[nn.Module]:
    """The parallel transforms, in order. With several ranks the balancing loss uses the
    global batch's routing statistics (so any world size trains the same model as one
    process). With expert parallelism each rank keeps only the modules it owns, reached by
    all-to-all. The module pools then leave the module tree DeepSpeed will see, whatever E
    (one code path, and checkpoints that move between any E); returned for ModulePools
    (README, "Expert parallelism"). None for a model without routed blocks."""
    if world > 1:
        use_global_balance_stats(model)
    if ep_size > 1:
        apply_expert_parallel(model, ep_size)
        for block in model.chunks:
            block.dispatcher.timings = {}  # the monitor logs all-to-all time per step
    return detach_pools(model) if len(model.chunks) else None


def load_initial_weights(model: MoMForCausalLM, path: str) -> None:
    """Weights written by mom-convert; every tensor must match the run's model."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"train.init_from = {path!r} does not fit this run's model (it was "
                         f"made for {saved['model_config']}): {err}. Fix: convert with this "
                         f"recipe's --config.") from None
