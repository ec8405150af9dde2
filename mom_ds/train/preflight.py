"""Checks that need files but no processes: run on every rank before the process group
starts, so a bad run stops with one clear message instead of a hang or a stack per rank."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, load_deepspeed_json
from ..parallel.placement import validate_expert_parallel
from .engine import build_ds_config, device_type, world_size_from_env


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
                              f"{data.vocab_size}).")
        if len(data) < world_size:
            raise ConfigError(f"{split}.bin in {data_dir} holds {len(data)} windows of "
                              f"data.seq_len = {run.data.seq_len} tokens, fewer than the "
                              f"{world_size} ranks. Fix: more data or a shorter data.seq_len.")


def check_pool_precision(run: RunConfig, ds_config: dict[str, Any]) -> None:
    """The module pools step beside the engine (train/module_pools.py) and join DeepSpeed's
    gradient norm where its ZeRO optimizer computes it. With bf16, DeepSpeed picks its
    BF16_Optimizer instead (which has no such place) at ZeRO-0, and at ZeRO-1 with fp32
    gradient accumulation (engine.py, _do_optimizer_sanity_check)."""
    if not run.model.n_chunks or not ds_config["bf16"]["enabled"]:
        return
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    offload = zero.get("offload_optimizer", {}).get("device") not in (None, "none")
    fp32_accum = ds_config.get("data_types", {}).get("grad_accum_dtype") in ("fp32", "float32")
    if stage == 0 or (stage == 1 and fp32_accum and not offload):
        raise ConfigError(f"{run.parallel.deepspeed}: bf16 with ZeRO stage {stage}"
                          f"{' and fp32 gradient accumulation' if stage else ''} is not "
                          f"supported for a model with routed blocks (DeepSpeed's bf16 optimizer "
                          f"then runs it). Fix: use ZeRO stage 1 or 2 without "
                          f"data_types.grad_accum_dtype (--deepspeed ds_configs/zero1.json), "
                          f"or train.precision fp32.")


def preflight(run: RunConfig) -> dict[str, Any]:
    """Every check before DeepSpeed starts; returns the completed DeepSpeed config."""
    world_size = world_size_from_env()
    validate_expert_parallel(run.model, world_size, run.parallel.expert_parallel_size)
    check_data(run, world_size)
    ds_config = build_ds_config(run, load_deepspeed_json(run.parallel.deepspeed), world_size,
                                device_type())
    check_pool_precision(run, ds_config)
    return ds_config
