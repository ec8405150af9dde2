"""Modular Transformers against layer dropping and plain distillation, and a trained MoM run
with compute chosen at inference, on real English text at CPU scale.

    python bench/modular.py [--teacher-steps 1500] [--mom-steps 1000] [--student-steps 500]
                            [--out DIR]

Data: the pydoc topics and standard-library docstrings (mom_ds_testing/corpus.py), byte tokens, 5% of
the documents held out. Teacher: vanilla GPT-2 of 6 layers (d 128) trained by mom-train.
Then, each for the same --student-steps x 16 windows of 128 tokens:
  modular    one mom-train run with a modular: section (granularities 2 and 3, replacing
             probability 0.3 rising linearly to 1 at the last step), then
             mom-assemble for every ratio it offers (1.2x, 1.5x, 2x, 3x) with the fixed rules
             coarsest and finest and by search (held-out loss on the last val windows);
  drop       the teacher with layers dropped (the best of first / last / evenly spaced on
             the same held-out windows), fine-tuned on the LM loss ("shrink and fine-tune");
  kd         the same start trained by LM + logit distillation from the teacher (the modular
             run's weights and temperature).
The baselines run in this script's loop, which is mom-train's single-process recipe (AdamW
with its parameter groups, the warmup + cosine schedule, clipping at 1.0, the same window
order). Every model is scored on the first --eval-windows val windows (the search never sees
them). Tokens/s: forward passes of one batch, every model in turn, --repeats rounds; the
median is reported, the range in the JSON. A second table: a MoM (H = 4, K = 2) trained by
mom-train for --mom-steps, evaluated at H' = 1..4 and K' = 1, 2 (mom-eval --depth /
--top-k). Writes DIR/modular.json, DIR/modular.md and DIR/modular.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

from mom_ds_testing.corpus import english_documents  # noqa: E402
from mom_ds.evaluation import Windows, row_windows, score  # noqa: E402
from mom_ds.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from mom_ds.data import TokenizedDataset, WindowSampler  # noqa: E402
from mom_ds.model import MoMForCausalLM  # noqa: E402
from mom_ds.model.flops import flops_per_token  # noqa: E402
from mom_ds.model.presets import mom, vanilla  # noqa: E402
from mom_ds.modular.compress import assembled_model, choose, load_student, search_windows  # noqa: E402
from mom_ds.modular.assembly import describe, offered_layer_counts  # noqa: E402
from mom_ds.modular.losses import logit_distillation  # noqa: E402
from mom_ds.parallel.parallelize import parallelize  # noqa: E402
from mom_ds.train.batches import Batches  # noqa: E402
from mom_ds.checkpoints.loading import load_model  # noqa: E402
from mom_ds.train.optimizer import scheduler  # noqa: E402

SHAPE = dict(vocab_size=257, n_positions=128, d_model=128, n_heads=4)
LAYERS, GRAINS, SEQ, MICRO = 6, [2, 3], 128, 16


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def prepare(work: Path) -> Path:
    out = work / "data"
    if (out / "meta.json").is_file():  # --work kept from an earlier invocation
        return out
    corpus = work / "english.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in english_documents():
            f.write(json.dumps({"text": doc}) + "\n")
    run([sys.executable, "-m", "data_prep.cli", "--source", str(corpus), "--tokenizer", "bytes",
         "--val-fraction", "0.05", "--out", str(out), "--quiet"])
    return out


def recipe(work: Path, name: str, model, steps: int, data: Path, **modular) -> Path:
    cfg = RunConfig(model=model or vanilla(LAYERS, **SHAPE),
                    data=DataConfig(data_dir=str(data), seq_len=SEQ))
    t = cfg.train
    t.out_dir, t.max_steps, t.micro_batch_size = str(work / name), steps, MICRO
    t.lr, t.min_lr, t.warmup_steps = 2e-3, 2e-4, min(50, steps // 4)
    t.log_interval, t.eval_interval, t.ckpt_interval, t.keep_checkpoints = 50, 0, 0, 1
    t.eval_batches, t.precision = 4, "fp32"
    values = cfg.to_dict()
    if modular:
        values["modular"] = modular
        del values["model"]  # a modular run's model is its teacher's
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def mom_train(config: Path) -> None:
    """Train the recipe, unless --work already holds its finished run (same recipe)."""
    out = Path(yaml.safe_load(config.read_text())["train"]["out_dir"])
    if (out / "ckpt" / "latest").is_file() and (out / "config.yaml").is_file():
        return
    run([sys.executable, "-m", "mom_ds.cli.train", "--config", str(config), "--overwrite"])


# --- the baselines ---------------------------------------------------------------------------
def dropped(teacher: MoMForCausalLM, keep: list[int]) -> MoMForCausalLM:
    model = MoMForCausalLM(dataclasses.replace(teacher.config, n_bottom=len(keep)))
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("bottom.")}
    for i, layer in enumerate(keep):
        state.update({f"bottom.{i}.{k}": v for k, v in teacher.bottom[layer].state_dict().items()})
    model.load_state_dict(state)
    return model


def drop_patterns(n_layers: int, layers: int) -> dict[str, list[int]]:
    spaced = [round(i * (n_layers - 1) / (layers - 1)) for i in range(layers)] if layers > 1 else [0]
    return {"first": list(range(layers)), "last": list(range(n_layers - layers, n_layers)),
            "spaced": spaced}


@torch.no_grad()
def rows_loss(model, rows: torch.Tensor) -> float:
    return score(model.eval(), row_windows(rows, 8)).loss


def train_baseline(model: MoMForCausalLM, teacher: MoMForCausalLM, data_dir: Path, steps: int,
                   kd: bool, modular_cfg: dict, seed: int = 1337,
                   layers_only: bool = False) -> MoMForCausalLM:
    """mom-train's one-process recipe in a plain loop: LM loss, or LM + logit distillation.
    `seed` is mom-train's train.seed and data.seed (dropout, window order); `layers_only`
    freezes the embeddings, the final norm and the head, as a modular student's are (its
    teacher's), so that both train the same kind of parameters."""
    t = TrainConfig(max_steps=steps, micro_batch_size=MICRO, lr=2e-3, min_lr=2e-4,
                    warmup_steps=min(50, steps // 4), seed=seed)
    torch.manual_seed(t.seed)
    if layers_only:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("bottom."))
    run = RunConfig(model=model.config, data=DataConfig(seq_len=SEQ), train=t)
    optimizer = torch.optim.AdamW(parallelize(model, run).param_groups, lr=t.lr,
                                  betas=(t.beta1, t.beta2), eps=t.eps)
    schedule = scheduler(optimizer, t)
    data = TokenizedDataset(data_dir, split="train", seq_len=SEQ)
    batches = Batches(data, WindowSampler(len(data), seed=seed), MICRO, torch.device("cpu"))
    model.train()
    for _ in range(steps):
        x, y = batches.next()
        out = model(x, labels=y)
        loss = out.lm_loss
        if kd:
            with torch.no_grad():
                target = teacher(x).logits
            loss = modular_cfg["lm_weight"] * loss + modular_cfg["kd_weight"] * \
                logit_distillation(out.logits, target, modular_cfg["kd_temperature"], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        schedule.step()
    return model.eval()


# --- one layer count ----------------------------------------------------------------------------
def modular_settings(teacher: Path, steps: int) -> dict:
    """The modular run's section: granularities 2 and 3, replacing probability 0.3 rising
    linearly to 1 at the last step, LM + logit + hidden-state distillation."""
    return dict(teacher=str(teacher), granularities=GRAINS, replace_prob=0.3,
                replace_prob_slope=0.7 / steps, lm_weight=1.0, kd_weight=1.0,
                kd_temperature=2.0, hidden_weight=1.0)


def compression_row(student, teacher: MoMForCausalLM, layers: int, held_out: torch.Tensor,
                    data: Path, steps: int, modular_cfg: dict, loss_of,
                    strategies: tuple[str, ...] = ("coarsest", "finest", "search"),
                    seed: int = 1337, layers_only: bool = False
                    ) -> tuple[dict, dict[str, MoMForCausalLM]]:
    """The teacher compressed to `layers` layers: the student assembled by each strategy,
    and the teacher with its best drop pattern (on the held-out rows) fine-tuned alone
    ("drop") and with distillation ("kd") for `steps` (train_baseline's `seed` and
    `layers_only`). `loss_of(model)` is the loss reported. Returns the row and the models
    (the drop model untrained, for timing)."""
    row: dict = {"ratio": LAYERS / layers, "layers": layers}
    models = {}
    for strategy in strategies:
        assembly, _ = choose(student, layers, strategy, held_out)
        models[strategy] = assembled_model(student, assembly)
        row[strategy] = {"loss": loss_of(models[strategy]), "assembly": describe(assembly)}
    patterns = drop_patterns(LAYERS, layers)
    best = min(patterns, key=lambda name: rows_loss(dropped(teacher, patterns[name]), held_out))
    models["drop"] = dropped(teacher, patterns[best])
    for name, kd in (("drop", False), ("kd", True)):
        trained = train_baseline(dropped(teacher, patterns[best]), teacher, data, steps, kd,
                                 modular_cfg, seed, layers_only)
        row[name] = {"loss": loss_of(trained), "init": f"{best} {patterns[best]}"}
    row["drop"]["untrained_loss"] = loss_of(models["drop"])
    row["flops_per_token"] = forward_flops(models["drop"])
    return row, models


# --- measurement -----------------------------------------------------------------------------
@torch.no_grad()
def tokens_per_s(models: dict[str, MoMForCausalLM], repeats: int) -> dict[str, list[float]]:
    """Forward tok/s of one 16 x 128 batch, the models interleaved round by round."""
    ids = torch.randint(0, 257, (MICRO, SEQ), generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            model.eval()
            model(ids)  # warm
            start = time.perf_counter()
            model(ids)
            rates[name].append(ids.numel() / (time.perf_counter() - start))
    return rates


def eval_windows(data: Path, n_windows: int) -> Windows:
    """The first n_windows val windows in file order (the search scores the last ones), in
    batches of 16: what every model is scored on."""
    val = TokenizedDataset(data, split="val", seq_len=SEQ)
    return row_windows(torch.from_numpy(val.windows(range(n_windows)).astype("int64")), 16)


def learned_assembly(student, data: Path, windows: Windows, fixed: list[dict],
                     steps: int) -> list[dict]:
    """Per-token paths under a price per layer (mom_ds/modular/learned.py), segments of 2 and
    of 3 layers, against the searched fixed assemblies at the same FLOPs (interpolated
    linearly between the two fixed ratios around it)."""
    from mom_ds.modular.learned import LearnedAssembly, fit_routers

    train = TokenizedDataset(data, split="train", seq_len=SEQ)
    curve = sorted((r["flops_per_token"], r["search"]["loss"]) for r in fixed)
    points = []
    for segment in (2, 3):
        for price in (0.0, 0.05, 0.2, 1.0):
            torch.manual_seed(0)
            model = LearnedAssembly(student, segment, price)
            batches = Batches(train, WindowSampler(len(train), seed=7), MICRO, torch.device("cpu"))
            fit_routers(model, batches, steps)
            model.eval()
            scored = score(model, windows, measure=lambda out: out.layers.sum())
            layers = scored.measured / scored.tokens  # mean layers a token executed
            flops = model.forward_flops_per_token(layers, SEQ)
            result = {"loss": scored.loss, "layers": layers, "flops_per_token": flops}
            result.update(segment=segment, price=price,
                          fixed_loss_at_equal_flops=interpolate(curve, flops))
            points.append(result)
            print(json.dumps(result), flush=True)
    return points


def interpolate(curve: list[tuple[float, float]], x: float) -> Optional[float]:
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def forward_flops(model: MoMForCausalLM) -> float:
    return flops_per_token(model.config, SEQ) / 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--mom-steps", type=int, default=1000)
    parser.add_argument("--student-steps", type=int, default=500)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--search-windows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--router-steps", type=int, default=150)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--work", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--learned-only", action="store_true",
                        help="with --work and --out of an earlier invocation: (re)compute only "
                             "the learned-assembly points and rewrite the outputs")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work or tempfile.mkdtemp(prefix="mom-modular-"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(work)
    val = TokenizedDataset(data, split="val", seq_len=SEQ)
    print(f"data: {TokenizedDataset(data, split='train', seq_len=SEQ).n_tokens:,} train tokens, "
          f"{val.n_tokens:,} val; work dir {work}", flush=True)
    assert len(val) >= args.eval_windows + args.search_windows, "val split too small"

    if args.learned_only:
        out = Path(args.out)
        results = json.loads((out / "modular.json").read_text())
        _, student, _ = load_student(work / "modular")
        results["learned"] = learned_assembly(student, data, eval_windows(data, args.eval_windows),
                                              results["rows"], args.router_steps)
        write_outputs(results, out)
        return 0

    scored_on = eval_windows(data, args.eval_windows)

    def loss(model) -> float:
        return score(model.eval(), scored_on).loss

    # stage 1: the teacher, and a MoM with the same budget
    mom_train(recipe(work, "teacher", vanilla(LAYERS, **SHAPE), args.teacher_steps, data))
    mom_train(recipe(work, "mom", mom(n_bottom=1, n_top=1, n_attn_modules=4, n_ffn_modules=4,
                                      depth=4, top_k=2, router_width=64, **SHAPE),
                     args.mom_steps, data))
    # stage 2: one modular run
    modular_cfg = modular_settings(work / "teacher", args.student_steps)
    mom_train(recipe(work, "modular", None, args.student_steps, data, **modular_cfg))
    print("teacher, MoM and modular runs trained", flush=True)

    _, teacher, _ = load_model(work / "teacher")
    run_cfg, student, _ = load_student(work / "modular")
    held_out = search_windows(run_cfg, args.search_windows)
    teacher_loss = loss(teacher)
    rows, models = [], {"teacher": teacher}
    for layers in offered_layer_counts(LAYERS, tuple(GRAINS))[1:]:
        row, compressed = compression_row(student, teacher, layers, held_out, data,
                                          args.student_steps, modular_cfg, loss)
        rows.append(row)
        models.update({f"{row['ratio']:.2g}x {name}": m for name, m in compressed.items()})
        print(json.dumps(row), flush=True)
    rates = tokens_per_s(models, args.repeats)
    learned = learned_assembly(student, data, scored_on, rows,
                               args.router_steps)

    mom_rows = []
    for depth in (4, 3, 2, 1):
        for top_k in (2, 1):
            mrun, model, _ = load_model(work / "mom", depth=depth, top_k=top_k)
            result = score(model.eval(), scored_on, config=model.config)
            mom_rows.append({"depth": depth, "top_k": top_k, "loss": result.loss,
                             "flops_per_token": result.flops_per_token})

    results = {"teacher": {"loss": teacher_loss, "flops_per_token": forward_flops(teacher),
                           "tokens_per_s": statistics.median(rates["teacher"])},
               "rows": rows, "mom": mom_rows, "learned": learned,
               "tokens_per_s": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                for k, v in rates.items()},
               "settings": vars(args)}
    write_outputs(results, Path(args.out))
    return 0


def write_outputs(results: dict, out: Path, stem: str = "modular", render=None,
                  draw=None) -> None:
    """OUT/STEM.json, OUT/STEM.md (render(results), printed too) and OUT/STEM.png
    (draw(results, path)); this script's markdown and plot unless given (bench/repro.py)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = (render or markdown)(results)
    (out / f"{stem}.md").write_text(table)
    (draw or plot)(results, out / f"{stem}.png")
    print(table)


def markdown(results: dict) -> str:
    t = results["teacher"]
    rates = results["tokens_per_s"]
    lines = [f"Teacher: 6 layers, val loss {t['loss']:.4f}, {t['flops_per_token'] / 1e6:.2f} "
             f"MFLOPs/token, {rates['teacher']['median']:,.0f} tok/s.", "",
             "| ratio | layers | MFLOPs/token | tok/s (search) | modular coarsest | modular finest "
             "| modular search | drop + fine-tune | KD student | search vs KD | search vs drop |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        def rel(loss: float) -> str:
            return f"{loss:.4f} ({100 * (loss / t['loss'] - 1):+.1f}%)"
        s, kd, drop = r["search"]["loss"], r["kd"]["loss"], r["drop"]["loss"]
        rate = rates[f"{r['ratio']:.2g}x search"]["median"]
        lines.append(
            f"| {r['ratio']:.2g}x | {r['layers']} | {r['flops_per_token'] / 1e6:.2f} | "
            f"{rate:,.0f} | {rel(r['coarsest']['loss'])} | "
            f"{rel(r['finest']['loss'])} | {rel(s)} | {rel(drop)} | {rel(kd)} | "
            f"{100 * (s / kd - 1):+.1f}% | {100 * (s / drop - 1):+.1f}% |")
    lines += ["", "Loss in parentheses: relative to the teacher. Assemblies chosen by search: " +
              "; ".join(f"{r['ratio']:.2g}x {r['search']['assembly']}" for r in results["rows"]),
              "", "| MoM H' | K' | val loss | MFLOPs/token |", "|---|---|---|---|"]
    lines += [f"| {m['depth']} | {m['top_k']} | {m['loss']:.4f} | {m['flops_per_token'] / 1e6:.2f} |"
              for m in results["mom"]]
    lines += ["", "| learned: segment | price | layers/token | MFLOPs/token | val loss | searched "
              "fixed assembly at equal FLOPs |", "|---|---|---|---|---|---|"]
    for r in results["learned"]:
        fixed = r["fixed_loss_at_equal_flops"]
        lines.append(f"| {r['segment']} | {r['price']} | {r['layers']:.2f} | "
                     f"{r['flops_per_token'] / 1e6:.2f} | {r['loss']:.4f} | "
                     f"{'-' if fixed is None else f'{fixed:.4f}'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows, t = results["rows"], results["teacher"]
    flops = [t["flops_per_token"] / 1e6] + [r["flops_per_token"] / 1e6 for r in rows]
    for key, label in (("search", "modular (search)"), ("coarsest", "modular (coarsest)"),
                       ("kd", "KD student"), ("drop", "drop + fine-tune")):
        left.plot(flops, [t["loss"]] + [r[key]["loss"] for r in rows], marker="o", label=label)
    for segment in (2, 3):
        pts = sorted((r["flops_per_token"] / 1e6, r["loss"]) for r in results["learned"]
                     if r["segment"] == segment)
        left.plot(*zip(*pts), marker="x", linestyle=":", label=f"learned paths (segment {segment})")
    left.set(xlabel="forward MFLOPs per token", ylabel="val loss",
             title="Compressing a 6-layer teacher")
    left.legend()
    for k in (1, 2):
        pts = sorted((m["flops_per_token"] / 1e6, m["loss"]) for m in results["mom"]
                     if m["top_k"] == k)
        right.plot(*zip(*pts), marker="o", label=f"K' = {k}")
    right.set(xlabel="forward MFLOPs per token", ylabel="val loss",
              title="MoM (H = 4, K = 2) at H' = 1..4")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
