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
2b. The llama block family (RMSNorm, rotary positions, SwiGLU, grouped-query attention,
   --kv-heads): its vanilla preset vs transformers.LlamaForCausalLM of the same shape
   (tokens/s ratio, target >= 1.0), and its MoM (K = 1) vs its vanilla (time / FLOPs ratio).
3. The GRU routers' share of a MoM step, reported separately: they are real arithmetic.
4. aten ops per forward + backward (a TorchDispatchMode counts them; profiler markers left
   out): each op is at least one kernel launch on a GPU, where at modest batch sizes launches,
   not FLOPs, set a step's time. For MoM, on both dispatch paths: the per-module loop (CPU,
   GPUs without the grouped GEMM) and grouped_mm (CUDA bf16 on compute capability 9.x/10.x).
   Target: MoM K = 1 at most 2.5x the vanilla 4-layer count. --compiled-ops adds, per model,
   the kernels inductor generates for a compiled forward + backward (slow on a CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mom_ds import MoMForCausalLM
from mom_ds.config import RunConfig
from mom_ds.model import pools, presets
from mom_ds.model.flops import flops_per_token, router_params
from mom_ds.parallel.parallelize import parallelize
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


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mom_ds":  # our custom operators: count what they run
            with self:
                return pools.IMPLEMENTATIONS[func.name()](*args, **kwargs)
        if func.namespace != "profiler":  # record_function markers launch nothing
            self.ops += 1
        return func(*args, **kwargs)


def aten_ops(step) -> int:
    """aten ops of one call of step (a forward + backward)."""
    step()  # warm: lazy initialisation out of the count
    with _OpCounter() as counter:
        step()
    return counter.ops


def compiled_kernels(model, step_of) -> int:
    """Kernels inductor generates for the compiled model's forward + backward."""
    from torch._inductor import metrics

    torch.compiler.reset()
    metrics.reset()
    step_of(torch.compile(model))()
    return metrics.generated_kernel_count


def op_table(build, make_step, names: list[str], with_compiled: bool) -> None:
    """Section 4: aten ops per forward + backward, both dispatch paths for MoM."""
    available = pools.grouped_mm_available
    rows = {}
    for name in names:
        model = build(name)
        loop = aten_ops(make_step(name, model))
        pools.grouped_mm_available = lambda x, w: True
        try:
            grouped = aten_ops(make_step(name, model))
        finally:
            pools.grouped_mm_available = available
        kernels = compiled_kernels(model, lambda m: make_step(name, m)) if with_compiled else None
        rows[name] = (loop, grouped, kernels)
    base = rows["vanilla"][0]
    print("\n| model | aten ops, per-module loop | aten ops, grouped_mm | vs vanilla (loop, "
          "grouped) |" + (" inductor kernels |" if with_compiled else ""))
    print("|---|---|---|---|" + ("---|" if with_compiled else ""))
    for name, (loop, grouped, kernels) in rows.items():
        target = " (target <= 2.5)" if name == "mom_k1" else ""
        print(f"| {name} | {loop:,} | {grouped:,} | {loop / base:.2f}x, {grouped / base:.2f}x"
              f"{target} |" + (f" {kernels:,} |" if with_compiled else ""))


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
    ap.add_argument("--kv-heads", type=int, default=0,
                    help="key/value heads of the llama-family models (default: the largest "
                         "divisor of --heads at most heads / 4)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--loss-chunk", type=int, default=1024,
                    help="tokens per chunk of mom-ds's LM head + loss (train.loss_chunk_tokens)")
    ap.add_argument("--ops-only", action="store_true",
                    help="only section 4 (op counts: no timing, quick)")
    ap.add_argument("--compiled-ops", action="store_true",
                    help="section 4 also counts inductor's kernels (compiles every model)")
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

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    kv_heads = args.kv_heads or max(n for n in range(1, max(1, args.heads // 4) + 1)
                                    if args.heads % n == 0)
    llama = dict(shape, block="llama", n_kv_heads=kv_heads)

    def build(name: str):
        if name == "hf":
            return GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.seq,
                                              n_embd=args.width, n_layer=4, n_head=args.heads,
                                              resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
        family = llama if name.startswith("llama") else shape
        if name == "llama_hf":
            c = presets.vanilla(4, **llama)
            return LlamaForCausalLM(LlamaConfig(
                vocab_size=args.vocab, hidden_size=args.width, intermediate_size=c.ffn_width,
                num_hidden_layers=4, num_attention_heads=args.heads,
                num_key_value_heads=c.kv_heads, max_position_embeddings=args.seq,
                rms_norm_eps=c.layer_norm_eps, tie_word_embeddings=c.tie_word_embeddings))
        if name.removeprefix("llama_").startswith("vanilla"):
            model = MoMForCausalLM(presets.vanilla(4, **family))
        else:
            model = MoMForCausalLM(presets.mom(n_attn_modules=4, n_ffn_modules=4, depth=4,
                                               top_k=int(name[-1]), **family))
        # the model as evaluation runs it (no optimizer here; one process: nothing sharded)
        parallelize(model, RunConfig.of_model(model.config), training=False)
        return model

    def make_step(name: str, model, rows=ids, targets=labels):
        chunk = 0 if name == "vanilla_whole" else args.loss_chunk
        return step_fn(model, rows, targets, name.endswith("hf"), chunk)

    names = ["hf", "vanilla", "vanilla_whole", "mom_k1", "mom_k2", "llama_hf", "llama_vanilla",
             "llama_mom_k1"]
    if args.ops_only:
        op_table(lambda n: build(n).to(device=device, dtype=dtype), make_step,
                 ["vanilla", "mom_k1", "mom_k2"], args.compiled_ops)
        return
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

    print(f"\nllama block family ({llama['n_kv_heads']} key/value heads, SwiGLU hidden "
          f"{models['llama_vanilla'].config.ffn_width}):\n")
    print("| model | tokens/s | step s | GFLOPs/token | vs baseline |")
    print("|---|---|---|---|---|")
    flops_l = flops_per_token(models["llama_vanilla"].config, args.seq)
    print(f"| HF LlamaForCausalLM, 4 layers | {tokens / secs['llama_hf']:,.0f} | "
          f"{secs['llama_hf']:.3f} | {flops_l / 1e9:.3f} | baseline |")
    print(f"| mom-ds vanilla preset (llama), 4 layers, loss in chunks of {args.loss_chunk} tokens | {tokens / secs['llama_vanilla']:,.0f} | "
          f"{secs['llama_vanilla']:.3f} | {flops_l / 1e9:.3f} | "
          f"{secs['llama_hf'] / secs['llama_vanilla']:.3f}x HF tokens/s (target >= 1.0) |")
    llama_mom = models["llama_mom_k1"]
    with torch.no_grad():
        flops_lm = flops_per_token(llama_mom.config, args.seq, llama_mom(ids).routing)
    print(f"| MoM (llama) A=F=4 H=4 K=1 | {tokens / secs['llama_mom_k1']:,.0f} | "
          f"{secs['llama_mom_k1']:.3f} | {flops_lm / 1e9:.3f} | time ratio / FLOPs ratio = "
          f"{(secs['llama_mom_k1'] / secs['llama_vanilla']) / (flops_lm / flops_l):.3f} vs "
          f"llama vanilla 4-layer |")

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
    op_table(lambda n: models[n], make_step, ["vanilla", "mom_k1", "mom_k2"], args.compiled_ops)


if __name__ == "__main__":
    main()
