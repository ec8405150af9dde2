"""Training throughput of mom-train, measured against baselines in the same run.

1. Engine overhead: mom-train (DeepSpeed engine, our loop, logging) on the vanilla preset
   vs a plain PyTorch loop training HF GPT2LMHeadModel of the same shape on the same
   windows with the same optimizer, schedule, clipping and batch. Target ratio >= 0.9.
2. MoM vs vanilla at equal parameters: executed training FLOPs per second (FLOPs from the
   routing actually taken), i.e. how much of vanilla's arithmetic rate MoM's routing and
   dispatch keep.
3. The trainer's features on that MoM run, one at a time: the whole logits instead of the
   chunked loss (train.loss_chunk_tokens 0), activation checkpointing per layer / routing
   step and per block, torch.compile (its compile time from the first log window): tokens/s
   and peak memory of the process against the default MoM run.

  python bench/train_speed.py [--steps 20] [--rounds 2] [--d-model 256] [--layers 6] [--seq-len 256]
One process (1 rank), fp32, on whatever device DeepSpeed picks (CPU here).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parent.parent


def mom_train_speed(args, data: Path, out: Path, model: list[str]) -> dict[str, float]:
    """Median tokens/s and FLOPs/s over mom-train's log windows after the first."""
    cmd = [sys.executable, "-m", "mom_ds.cli.train", "--config", str(REPO / "configs/tiny.yaml"),
           "--data.data_dir", str(data), "--train.out_dir", str(out),
           "--data.seq_len", str(args.seq_len), "--model.n_positions", str(args.seq_len),
           "--model.d_model", str(args.d_model), "--model.n_heads", str(args.heads),
           "--train.micro_batch_size", str(args.batch), "--train.max_steps", str(args.steps),
           "--train.warmup_steps", "2", "--train.log_interval", "5",
           "--train.eval_interval", "0", "--train.eval_batches", "1",
           "--train.ckpt_interval", "0", "--train.precision", "fp32",
           "--deepspeed", str(REPO / "ds_configs/zero0.json"), *model]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        sys.exit(f"mom-train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    perf = [r for r in rows if "perf/tokens_per_s" in r and r["step"] > 5]
    tokens_per_s = median(r["perf/tokens_per_s"] for r in perf)
    first = next(r for r in rows if "perf/tokens_per_s" in r and r["step"] == 1)
    return {"tokens_per_s": tokens_per_s,
            "flops_per_s": median(r["perf/flops_per_s"] for r in perf),
            "memory_gb": max(r["perf/memory_gb"] for r in rows if "perf/memory_gb" in r),
            # step 1 is logged alone: its time holds the first call's work (compilation)
            "first_step_s": args.batch * args.seq_len / first["perf/tokens_per_s"]}


def hf_loop_speed(args, data: Path) -> dict[str, float]:
    """The plain loop: same windows (same sampler), AdamW groups, warmup+cosine, clipping."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mom_ds.config import TrainConfig
    from mom_ds.data import TokenizedDataset, WindowSampler
    from mom_ds.model.flops import flops_per_token
    from mom_ds.model.presets import vanilla
    from mom_ds.parallel.parallelize import optimizer_groups
    from mom_ds.train.optimizer import scheduler

    torch.manual_seed(1337)
    cfg = GPT2Config(vocab_size=257, n_positions=args.seq_len, n_embd=args.d_model,
                     n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=256, eos_token_id=256)
    model = GPT2LMHeadModel(cfg).train()
    t = TrainConfig(max_steps=args.steps, warmup_steps=2, lr=3e-3, min_lr=3e-4)
    opt = torch.optim.AdamW(optimizer_groups(model, t.weight_decay), lr=t.lr,
                            betas=(t.beta1, t.beta2), eps=t.eps)
    sched = scheduler(opt, t)
    ds = TokenizedDataset(data, split="train", seq_len=args.seq_len)
    order = WindowSampler(len(ds), seed=1337)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        rows = torch.from_numpy(ds.windows([next(order) for _ in range(args.batch)])
                                .astype("int64"))
        loss = model(rows[:, :-1], labels=rows[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        float(loss.detach())  # mom-train reads the loss every step too
        times.append(time.perf_counter() - start)
    tokens_per_s = args.batch * args.seq_len / median(times[5:])
    fpt = flops_per_token(vanilla(args.layers, vocab_size=257, n_positions=args.seq_len,
                                  d_model=args.d_model, n_heads=args.heads), args.seq_len)
    return {"tokens_per_s": tokens_per_s, "flops_per_s": tokens_per_s * fpt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved repetitions; the best of each is reported, so a "
                             "busy shared machine slows all three alike or none")
    parser.add_argument("--data", type=Path, help="a mom-prep byte-level directory "
                        "(default: prepare the built-in corpus in a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            from data_prep.cli import main as mom_prep
            data = tmp / "data"
            mom_prep(["--source", "builtin", "--tokenizer", "bytes", "--out", str(data)])
        L = str(args.layers)
        vanilla = ["--model.n_bottom", L, "--model.n_routed_blocks", "0", "--model.n_top", "0"]
        mom = ["--model.n_bottom", "0", "--model.n_routed_blocks", "1", "--model.n_top", "0",
               "--model.n_attn_modules", L, "--model.n_ffn_modules", L, "--model.depth", L,
               "--model.top_k", "1", "--model.router_width", "64"]
        features = {"whole logits (loss_chunk_tokens 0)": ["--train.loss_chunk_tokens", "0"],
                    "activation_checkpointing layer": ["--train.activation_checkpointing",
                                                       "layer"],
                    "activation_checkpointing block": ["--train.activation_checkpointing",
                                                       "block"],
                    "compile": ["--train.compile", "true"]}
        results: dict[str, list[dict[str, float]]] = {
            "hf": [], "vanilla": [], "mom": [], **{name: [] for name in features}}
        for r in range(args.rounds):
            results["hf"].append(hf_loop_speed(args, data))
            results["vanilla"].append(mom_train_speed(args, data, tmp / f"vanilla{r}", vanilla))
            results["mom"].append(mom_train_speed(args, data, tmp / f"mom{r}", mom))
            for i, (name, extra) in enumerate(features.items()):
                results[name].append(mom_train_speed(args, data, tmp / f"feature{i}_{r}",
                                                     mom + extra))
        best = {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in results.items()}
        hf, van, mm = best["hf"], best["vanilla"], best["mom"]
    print(f"# train_speed: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, 1 rank, fp32; "
          f"d_model {args.d_model}, {args.layers} layers, seq {args.seq_len}, batch "
          f"{args.batch}, median of steps 6..{args.steps}, best of {args.rounds} interleaved "
          f"rounds; load average {os.getloadavg()[0]:.1f}")
    print("| run | tokens/s | GFLOP/s executed | ratio |")
    print("|---|---|---|---|")
    print(f"| plain PyTorch loop, HF GPT2LMHeadModel | {hf['tokens_per_s']:,.0f} | "
          f"{hf['flops_per_s'] / 1e9:.1f} | 1.00 (baseline) |")
    print(f"| mom-train, vanilla preset | {van['tokens_per_s']:,.0f} | "
          f"{van['flops_per_s'] / 1e9:.1f} | {van['tokens_per_s'] / hf['tokens_per_s']:.2f} "
          f"(tokens/s vs plain loop; target >= 0.9) |")
    print(f"| mom-train, MoM ({L} + {L} modules, H = {L}, K = 1) | {mm['tokens_per_s']:,.0f} | "
          f"{mm['flops_per_s'] / 1e9:.1f} | {mm['flops_per_s'] / van['flops_per_s']:.2f} "
          f"(executed FLOP/s vs vanilla) |")
    print("\n| MoM run with | tokens/s | vs default | peak memory GB | vs default |")
    print("|---|---|---|---|---|")
    print(f"| defaults (chunked loss, no checkpointing, eager) | {mm['tokens_per_s']:,.0f} | "
          f"1.00 | {mm['memory_gb']:.2f} | 1.00 |")
    for name in features:
        f = best[name]
        extra = (f"; step 1 took {f['first_step_s']:.1f} s against {mm['first_step_s']:.1f} s "
                 f"eager (compilation)") if name == "compile" else ""
        print(f"| {name} | {f['tokens_per_s']:,.0f} | "
              f"{f['tokens_per_s'] / mm['tokens_per_s']:.2f}{extra} | {f['memory_gb']:.2f} | "
              f"{f['memory_gb'] / mm['memory_gb']:.2f} |")


if __name__ == "__main__":
    main()
