"""Model speed, forward + backward, ratios measured in one run (CPU fp32 by default).

    python bench/model_speed.py [--width 512 --heads 8 --seq 256 --batch 8 --vocab 8192]
                                [--device cuda --dtype bf16] [--loss-chunk 1024]

1. vanilla preset vs transformers.GPT2LMHeadModel (same shape): tokens/s ratio (target >= 1.0;
   at --vocab 50257, >= 1.3), with the LM head + loss chunked (train.loss_chunk_tokens) and
   whole, and the peak memory of one step of each (a fresh process per model: the resident set's
   high-water mark on the CPU, max_memory_allocated on CUDA)
2. MoM (one block, A = F = 4, H = 4) at K = 1 and K = 2 vs a vanilla 4-layer model:
   (step-time ratio) / (FLOPs ratio from flops_per_token with the routing taken, routers
   included): what routing, permutation and combining cost beyond their arithmetic
   (targets <= 1.10 and <= 1.05).
3. The GRU routers' share of a MoM step, reported separately: they are real arithmetic.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from mom_ds import MoMForCausalLM
from mom_ds.model import presets
from mom_ds.model.flops import flops_per_token, router_params
from mom_ds.train.monitor import peak_rss_bytes, reset_peak_rss, rss_bytes


def step_fn(model, ids, labels, hf: bool, loss_chunk: int = 0):
    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids) if hf else model(ids, labels=labels,
                                                       loss_chunk_tokens=loss_chunk)
        out.loss.backward()
        return out
    return step


def peak_memory_mb(argv: list[str], name: str) -> float:
    """Peak memory of one forward + backward of `name`, in a process of its own."""
    proc = subprocess.run([sys.executable, __file__, *argv, "--peak-of", name],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def measure_peak(fn, warm, device: torch.device) -> float:
    """MB that one call of fn adds above the process's state after `warm` (a step on one
    short row, which allocates the gradients)."""
    warm()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    reset_peak_rss()
    before = rss_bytes()
    fn()
    return (peak_rss_bytes() - before) / 2 ** 20


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call; the candidates take turns so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--loss-chunk", type=int, default=1024,
                    help="tokens per chunk of mom-ds's LM head + loss (train.loss_chunk_tokens)")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)  # one model's peak, in a subprocess
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    shape = dict(vocab_size=args.vocab, n_positions=args.seq, d_model=args.width,
                 n_heads=args.heads)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    tokens = ids.numel()

    from transformers import GPT2Config, GPT2LMHeadModel

    def build(name: str):
        if name == "hf":
            return GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.seq,
                                              n_embd=args.width, n_layer=4, n_head=args.heads,
                                              resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
        if name.startswith("vanilla"):
            return MoMForCausalLM(presets.vanilla(4, **shape))
        return MoMForCausalLM(presets.mom(n_attn_modules=4, n_ffn_modules=4, depth=4,
                                          top_k=int(name[-1]), **shape))

    def make_step(name: str, model, rows=ids, targets=labels):
        chunk = 0 if name == "vanilla_whole" else args.loss_chunk
        return step_fn(model, rows, targets, name == "hf", chunk)

    names = ["hf", "vanilla", "vanilla_whole", "mom_k1", "mom_k2"]
    if args.peak_of:
        model = build(args.peak_of).to(device=device, dtype=dtype)
        peak = measure_peak(make_step(args.peak_of, model),
                            make_step(args.peak_of, model, ids[:1, :8], labels[:1, :8]), device)
        print(json.dumps({"peak_mb": peak}))
        return
    models = {name: build(name).to(device=device, dtype=dtype) for name in names}
    vanilla = models["vanilla"]
    moms = {k: models[f"mom_k{k}"] for k in (1, 2)}
    fns = {name: make_step(name, model) for name, model in models.items()}
    secs = time_interleaved(fns, args.repeats)
    peaks = {name: peak_memory_mb(sys.argv[1:], name) for name in ("hf", "vanilla", "vanilla_whole")}

    flops_v = flops_per_token(vanilla.config, args.seq)
    print(f"{args.device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; width "
          f"{args.width}, {args.heads} heads, seq {args.seq}, batch {args.batch}, vocab "
          f"{args.vocab}; median of {args.repeats} forward+backward steps\n")
    target_hf = 1.3 if args.vocab >= 50257 else 1.0
    print("| model | tokens/s | step s | peak MB | GFLOPs/token | vs baseline |")
    print("|---|---|---|---|---|---|")
    print(f"| HF GPT2LMHeadModel, 4 layers | {tokens / secs['hf']:,.0f} | {secs['hf']:.3f} | "
          f"{peaks['hf']:,.0f} | {flops_v / 1e9:.3f} | baseline |")
    for name, what in (("vanilla", f"loss in chunks of {args.loss_chunk} tokens"),
                       ("vanilla_whole", "whole logits")):
        print(f"| mom-ds vanilla preset, 4 layers, {what} | {tokens / secs[name]:,.0f} | "
              f"{secs[name]:.3f} | {peaks[name]:,.0f} | {flops_v / 1e9:.3f} | "
              f"{secs['hf'] / secs[name]:.3f}x HF tokens/s (target >= {target_hf}) |")
    for k, model in moms.items():
        with torch.no_grad():
            routing = model(ids).routing
        flops_m = flops_per_token(model.config, args.seq, routing)
        overhead = (secs[f"mom_k{k}"] / secs["vanilla"]) / (flops_m / flops_v)
        target = 1.10 if k == 1 else 1.05
        print(f"| MoM A=F=4 H=4 K={k} (one block) | {tokens / secs[f'mom_k{k}']:,.0f} | "
              f"{secs[f'mom_k{k}']:.3f} | {flops_m / 1e9:.3f} | time ratio / FLOPs ratio = "
              f"{overhead:.3f} vs vanilla 4-layer (target <= {target}) |")

    cfg = moms[1].config
    block = moms[1].chunks[0]
    x = torch.randn(tokens, args.width, device=device, dtype=dtype, requires_grad=True)

    def routers_only():
        g_a = g_f = None
        total = 0
        for step in range(cfg.depth):
            ra, g_a = block.attn_router(x, g_a, step)
            rf, g_f = block.ffn_router(x, g_f, step)
            total = total + ra.weights.sum() + rf.weights.sum()
        total.backward()
    router_s = time_interleaved({"r": routers_only}, args.repeats)["r"]
    share_flops = 6 * 2 * cfg.depth * router_params(cfg, "gru") / flops_per_token(cfg, args.seq)
    layer_params = 12 * args.width ** 2
    print(f"\nGRU routers (width {cfg.router_width}, attention + FFN, {cfg.depth} steps): "
          f"{router_s:.3f} s of the K=1 step ({router_s / secs['mom_k1']:.0%}); "
          f"{share_flops:.0%} of its planned FLOPs; per step the two routers hold "
          f"{2 * router_params(cfg, 'gru') / layer_params:.2f} of a layer's parameters "
          f"({2 * router_params(cfg.__class__(d_model=768, n_heads=12), 'gru') / (12 * 768 ** 2):.2f}"
          f" at width 768).")


if __name__ == "__main__":
    main()
