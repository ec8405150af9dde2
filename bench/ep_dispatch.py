"""Expert-parallel dispatch on 2 CPU ranks (gloo), measured in one run.

    python bench/ep_dispatch.py [--experts 8 --top-k 2 --width 256 --tokens 4096 --steps 5]

(a) bytes a rank exchanges per forward vs the theoretical minimum for the routing taken
    (every (token, module) row whose module lives on the other rank goes out once and its
    result comes back once; target <= 1.1);
(b) tokens/s of a MoM FFN-only routed layer (sorted plan + AllToAllDispatcher + the
    stacked pool on grouped GEMM) vs
    `deepspeed.moe.layer.MoE` with the same experts, K, hidden size and ep_size on the same
    tokens, forward + backward (target >= 1.0), DeepSpeed both dropless and at its default
    capacity factor 1.0;
(c) a time breakdown of the MoM layer's forward: routing, permutation, exchange, module
    compute, combine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from mom_ds_testing.multirank import run_ranks  # noqa: E402

from mom_ds.model import MoMConfig  # noqa: E402
from mom_ds.model.dispatch import make_plan  # noqa: E402
from mom_ds.model.modules import FFNModule, init_gpt2_  # noqa: E402
from mom_ds.model.pools import FFNPool  # noqa: E402
from mom_ds.parallel.dispatch import AllToAllDispatcher  # noqa: E402
from mom_ds.engine_adapter import expert_groups  # noqa: E402
from mom_ds.parallel.placement import ModulePlacement  # noqa: E402


def ffn_shape(width: int) -> MoMConfig:
    """GPT-2 FFN modules of this width (the shape both layers' experts take)."""
    return MoMConfig(d_model=width, n_heads=1)


class MoMFFNLayer(nn.Module):
    """Token-choice top-K over a sharded FFN pool: linear gate (as DeepSpeed's), sorted
    plan, all-to-all dispatch. Holds only this rank's experts, stacked."""

    def __init__(self, width, n_experts, top_k, ep_size, ep_rank, group, capacity_factor=0.0):
        super().__init__()
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.gate = nn.Linear(width, n_experts, bias=False)
        placement = ModulePlacement(n_experts, ep_size, ep_rank)
        self.experts = FFNPool(ffn_shape(width), placement.per_rank)
        init_gpt2_(self.experts, 0.02, 1)
        self.dispatcher = AllToAllDispatcher(group, 0, "FFN", placement)
        self.n_experts = n_experts

    def forward(self, x):
        t0 = time.perf_counter()
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        top_p, ids = probs.topk(self.top_k, dim=-1)
        plan = make_plan(ids, top_p / top_p.sum(-1, keepdim=True), self.n_experts,
                         self.capacity_factor)
        if self.dispatcher.timings is not None:
            self.dispatcher.timings["routing"] = self.dispatcher.timings.get("routing", 0.0) \
                + time.perf_counter() - t0
        return self.dispatcher.run(self.experts.normalize(x), plan, self.experts), plan


def interleaved_median(layers: dict, step, steps: int, warmup: int = 2) -> dict:
    """Median seconds per step of each layer; the layers take turns, so load from anything
    else on the machine hits them alike."""
    for layer in layers.values():
        for _ in range(warmup):
            step(layer)
    times = {name: [] for name in layers}
    for _ in range(steps):
        for name, layer in layers.items():
            dist.barrier()
            t0 = time.perf_counter()
            step(layer)
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def rank_main(rank, world, args):
    torch.set_num_threads(1)  # two ranks share two cores
    from deepspeed.moe.layer import MoE

    ep_group, _ = expert_groups(world)
    torch.manual_seed(1000 + rank)
    x = torch.randn(args.tokens, args.width, requires_grad=True)
    torch.manual_seed(0)
    mom = MoMFFNLayer(args.width, args.experts, args.top_k, world, rank, ep_group)

    torch.manual_seed(0)
    mom_cf1 = MoMFFNLayer(args.width, args.experts, args.top_k, world, rank, ep_group, 1.0)
    layers = {"mom_dropless": mom, "mom_cf1": mom_cf1}
    for label, drop in (("ds_dropless", False), ("ds_cf1", True)):
        torch.manual_seed(0)
        layers[label] = MoE(hidden_size=args.width, expert=FFNModule(ffn_shape(args.width)),
                            num_experts=args.experts, ep_size=world, k=args.top_k,
                            capacity_factor=1.0, drop_tokens=drop, use_rts=False)
        layers[label].set_deepspeed_parallelism()  # the engine does this at initialize

    def step(layer):
        layer.zero_grad(set_to_none=True)
        out = layer(x)[0] if isinstance(layer, MoMFFNLayer) else layer(x.unsqueeze(0))[0]
        out.float().pow(2).mean().backward()

    results = {name: interleaved_median(layers, step, args.steps)[name] for name in layers}

    # (a) bytes and (c) time breakdown, over `steps` warm forwards
    d = mom.dispatcher
    d.bytes_sent = d.header_bytes = 0
    d.timings = {}
    remote_rows = 0
    mine = ModulePlacement(args.experts, world, rank).owned()
    with torch.no_grad():
        for _ in range(args.steps):
            _, plan = mom(x)
            chosen = plan.counts[:args.experts]
            remote_rows += int(chosen.sum() - chosen[mine].sum())
    results["bytes"] = (d.bytes_sent, d.header_bytes, remote_rows * args.width * x.element_size())
    results["timings"] = {k: v / args.steps for k, v in d.timings.items()}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    res = run_ranks(rank_main, 2, args, timeout=900, collective_timeout=60)
    tokens = 2 * args.tokens
    print(f"2 ranks (gloo, CPU, 1 thread each), {args.experts} FFN experts of width "
          f"{args.width}, K = {args.top_k}, {args.tokens} tokens per rank, ep_size 2; "
          f"median of {args.steps} forward+backward steps\n")
    rows = sum(o["bytes"][0] for o in res)
    header = sum(o["bytes"][1] for o in res)
    # Minimum: each row bound for the other rank crosses once out and its result once back.
    minimum = 2 * sum(o["bytes"][2] for o in res)
    print(f"(a) bytes crossing between the ranks in {args.steps} forwards, both ranks together")
    print(f"  measured {rows + header:,} B (rows {rows:,} + headers {header:,}) / theoretical "
          f"minimum {minimum:,} B = {(rows + header) / minimum:.4f} (target <= 1.1)")
    print("\n(b) tokens/s, forward + backward, both ranks together")
    print("| layer | tokens/s | MoM / DeepSpeed |\n|---|---|---|")
    for mom_label, ds_label, what in (("mom_dropless", "ds_dropless", "dropless"),
                                      ("mom_cf1", "ds_cf1", "capacity factor 1.0")):
        mom_s = max(o[mom_label] for o in res)
        ds_s = max(o[ds_label] for o in res)
        print(f"| MoM FFN-only routed layer, {what} | {tokens / mom_s:,.0f} | "
              f"{ds_s / mom_s:.2f}x (target >= 1.0) |")
        print(f"| deepspeed.moe.layer.MoE, {what} | {tokens / ds_s:,.0f} | |")
    print("\n(c) MoM layer forward time breakdown (rank 0, mean of warm forwards)")
    timings = res[0]["timings"]
    total = sum(timings.values())
    for phase in ("routing", "permute", "exchange", "compute", "combine"):
        print(f"  {phase:9s} {timings.get(phase, 0.0) * 1e3:8.2f} ms  "
              f"{timings.get(phase, 0.0) / total:5.1%}")


if __name__ == "__main__":
    main()
