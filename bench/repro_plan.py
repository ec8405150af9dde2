"""bench/repro.py --plan gpt2-small: the same comparisons at GPT-2 small's scale on
OpenWebText, for one node of 8 GPUs, written as mom-train recipes and one launch script.

The arms are bench/repro.py's (`arms()`) for a 12-layer vanilla model of d_model 768 with
GPT-2's vocabulary; the training settings are configs/gpt2-small.yaml's (the MoM authors'
recipe: 524,288 tokens per step, AdamW at 1e-3, bf16 where the GPU has it, ZeRO-1). The
token counts keep the CPU run's proportions to N1 = 2.5B, about 20 tokens per parameter for
the donor (N2 = N1 / 5, the teacher 2 x N1, each compressed model N1 / 17), and so do the
window orders (bench/repro_arms.py's data_seed()). The hours are
estimates: training FLOPs (mom-ds's count, the routing planned) over the node's dense bf16
peak at an assumed MFU, stated in the plan; the first runs replace them with measured ones.

Not planned: the compression baselines (the teacher's layers dropped, then fine-tuned or
distilled, with embeddings and head frozen) run in bench/modular.py's single-process loop,
which has no multi-GPU launcher; at this scale they would need mom-train to freeze
parameters and take a distillation loss. The plan lists the modular run and says so.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from modular import MICRO as MODULAR_MICRO, modular_settings
from mom_ds.config import load_run_config
from mom_ds.model.flops import flops_per_token
from repro_arms import (COMPRESSION_STEPS, MICRO, SEED_DIR, STAGE1_STEPS, STAGE2_STEPS,
                        TEACHER_DATA_SEED, TEACHER_FACTOR, Arm, arms, data_seed)

REPO = Path(__file__).resolve().parent.parent
GPUS = 8
PEAK_TFLOPS = 989.0  # one H100 SXM, dense bf16
MFU = 0.35  # assumed for every arm: nanoGPT-class GPT-2 small training reaches 30-45%
RECIPE = REPO / "configs" / "gpt2-small.yaml"
SHAPE = dict(n_positions=1024, d_model=768, n_heads=12, vocab_size=50257)
LAYERS = 12
N1_TOKENS = 2_500_000_000
LAUNCH = f"deepspeed --num_gpus {GPUS} $(which mom-train)"
RUNS = "runs/repro-gpt2-small"


def plan_arms(step_tokens: int) -> tuple[list[Arm], int, int]:
    """The arms, N1 in steps, and the steps of each compressed model: N2, the teacher's and
    the compression tokens in the CPU run's proportions to N1."""
    n1 = math.ceil(N1_TOKENS / step_tokens)
    n2 = n1 * STAGE2_STEPS // STAGE1_STEPS
    compression = n1 * COMPRESSION_STEPS * MODULAR_MICRO // (STAGE1_STEPS * MICRO)
    return arms(SHAPE, LAYERS, n1, n2, step_tokens), n1, compression


def recipe(out: Path, name: str, model, steps: int, seed: int, window_seed: int,
           **extra) -> Path:
    """configs/gpt2-small.yaml with this run's model, steps, seeds and run directory; its
    path as run.sh names it (relative to the repository when it lies inside)."""
    cfg = load_run_config(RECIPE)
    if model is not None:
        cfg.model = model
    cfg.train.max_steps = steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, steps // 10)
    cfg.train.seed, cfg.data.seed = seed, window_seed
    cfg.train.out_dir = f"{RUNS}/{name}"
    values = cfg.to_dict()
    if extra.get("modular"):
        values["modular"] = extra["modular"]
        del values["model"]  # a modular run's model is its teacher's
    path = out.resolve() / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def hours(tokens: int, flops_per_tok: float) -> float:
    return tokens * flops_per_tok / (GPUS * PEAK_TFLOPS * 1e12 * MFU) / 3600


def write_plan(name: str, out: Path, seeds: int) -> int:
    """OUT/<seed-S>/<arm>.yaml, OUT/teacher.yaml, OUT/run.sh and OUT/plan.md."""
    base = load_run_config(RECIPE)
    step_tokens = base.train.micro_batch_size * base.train.grad_accum_steps * GPUS * \
        base.data.seq_len
    plan, n1, compression = plan_arms(step_tokens)
    seq = SHAPE["n_positions"]
    script = ["#!/usr/bin/env bash", "# bench/repro.py --plan gpt2-small: run from the "
              "repository root on one node of 8 GPUs, after", "#   mom-prep --source "
              "openwebtext --out data/openwebtext", "set -euo pipefail"]
    rows: list[tuple[str, int, float, float]] = []  # run, tokens, FLOPs per token, hours

    def run(label: str, config: Path, steps: int, flops_per_tok: float, args: str = "") -> None:
        script.append(f"{LAUNCH} --config {config}{args}")
        rows.append((label, steps * step_tokens, flops_per_tok,
                     hours(steps * step_tokens, flops_per_tok)))

    teacher_model = plan[0].model
    teacher_steps = TEACHER_FACTOR * n1
    run("teacher (once)", recipe(out, "teacher", teacher_model, teacher_steps, 1,
                                 TEACHER_DATA_SEED),
        teacher_steps, flops_per_token(teacher_model, seq))
    for seed in range(1, seeds + 1):
        split = SEED_DIR.format(seed)
        runs = f"{RUNS}/{split}"
        script.append(f"# {split}")
        for arm in (a for a in plan if a.runs_with(seed)):
            config = recipe(out, f"{split}/{arm.key}", arm.model, arm.steps, seed,
                            data_seed(arm, seed))
            args = ""
            if arm.init == "donor":
                init = f"{runs}/{arm.key}-init.safetensors"
                script.append(f"mom-convert from-hf {runs}/donor-hf {init} --config {config} "
                              f"--seed {seed}")
                args = f" --train.init_from {init}"
            run(f"{split} {arm.label}", config, arm.steps, flops_per_token(arm.model, seq), args)
            if arm.key == "donor":
                script.append(f"mom-convert to-hf {runs}/donor {runs}/donor-hf")
        modular = modular_settings(f"{RUNS}/teacher", compression)
        # the teacher's forward + the student's training
        run(f"{split} modular run", recipe(out, f"{split}/modular", None, compression, seed,
                                           seed, modular=modular),
            compression, flops_per_token(teacher_model, seq) * 4 / 3)
    total = sum(h for *_, h in rows)
    (out / "run.sh").write_text("\n".join(script) + "\n")
    lines = [f"# bench/repro.py --plan {name}", "",
             f"{len(rows)} runs for one node of {GPUS} GPUs; {step_tokens:,} tokens per step; "
             f"hours at an assumed MFU of {100 * MFU:g}% of {PEAK_TFLOPS:g} dense bf16 TFLOP/s "
             f"per GPU. Total: about {total:.0f} hours. Commands: run.sh.", "",
             "| run | tokens | training GFLOPs/token | hours |", "|---|---|---|---|"]
    lines += [f"| {r} | {t / 1e9:.2f}B | {f / 1e9:.2f} | {h:.2f} |" for r, t, f, h in rows]
    lines += ["", "Not planned: the compression baselines (dropped layers fine-tuned or "
              "distilled); bench/modular.py trains them in one process."]
    (out / "plan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
