"""Bytes per rank of the module pools' weights and AdamW state, measured from DeepSpeed's own
tensors after one step, for W = 1, 2, 4 ranks, E = 1, 2, ZeRO-1/2/3, beside the fully sharded
optimum (every byte once in the job, split evenly over the W ranks).

    python bench/pool_memory.py [--width 64]

weights: the pool parameters a rank stores (ZeRO-3: its partitions, `ds_tensor`); optimizer:
the fp32 master fragments and the two AdamW moments ZeRO gives the rank for pool parameters.
"""
from __future__ import annotations

import argparse
import os

import torch

from mom_ds_testing.multirank import run_ranks  # noqa: E402

from mom_ds import MoMForCausalLM  # noqa: E402
from mom_ds import engine_adapter as adapter  # noqa: E402
from mom_ds.model import presets  # noqa: E402
from mom_ds.config import RunConfig  # noqa: E402
from mom_ds.parallel.parallelize import parallelize  # noqa: E402


def build(width: int) -> MoMForCausalLM:
    torch.manual_seed(0)
    return MoMForCausalLM(presets.mom(n_routed_blocks=2, n_attn_modules=4, n_ffn_modules=4, depth=2,
                                      vocab_size=64, n_positions=32, d_model=width, n_heads=4,
                                      router_width=16))


def rank_bytes(rank, world, ep_size, stage, width):
    import deepspeed

    torch.set_num_threads(1)
    model = build(width)
    layout = parallelize(model, RunConfig.of_model(model.config, ep_size))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=layout.param_groups)
    ids = torch.randint(0, 64, (2, 16))
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    weights = master = 0
    for name, p in model.named_parameters():
        if "_pool." not in name:
            continue
        if hasattr(p, "ds_tensor"):
            weights += p.ds_tensor.numel() * p.ds_tensor.element_size()
            master += p.ds_tensor.numel() * 4
        else:
            weights += p.numel() * p.element_size()
            master += adapter.zero12_fragment_numel(p) * 4
    return weights, master, 3 * master  # master + exp_avg + exp_avg_sq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    total = sum(p.numel() for n, p in build(args.width).named_parameters() if "_pool." in n)
    print(f"module pools: 2 blocks x (4 attention + 4 FFN modules) at width {args.width} = "
          f"{total:,} parameters, fp32 ({4 * total:,} B of weights, {12 * total:,} B of "
          f"optimizer state: master + 2 moments)\n")
    print("| W | E | ZeRO | weights B/rank | optimizer B/rank | optimum weights | optimum "
          "optimizer | optimizer / optimum |")
    print("|---|---|---|---|---|---|---|---|")
    for world in (1, 2, 4):
        for ep_size in (1, 2):
            if ep_size > world:
                continue
            for stage in (1, 2, 3):
                per_rank = run_ranks(rank_bytes, world, ep_size, stage, args.width, timeout=600)
                weights = max(r[0] for r in per_rank)
                optimizer = max(r[2] for r in per_rank)
                best_w, best_o = 4 * total / world, 12 * total / world
                print(f"| {world} | {ep_size} | {stage} | {weights:,} | {optimizer:,} | "
                      f"{best_w:,.0f} | {best_o:,.0f} | {optimizer / best_o:.2f} |", flush=True)


if __name__ == "__main__":
    main()
