"""The papers' comparisons in miniature, on real English text at CPU scale, side by side.

    python bench/repro.py [--budget 1.0] [--quick] [--seed 1337] [--data DIR] [--out DIR]

Corpus: Debian's Python documentation (apt-get install python3.11-doc: the HTML pages under
/usr/share/doc/python3.11/html, turned into text by mom-prep's HTML reader), GPT-2
tokenizer (tiktoken's; offline, MOM_GPT2_DIR names a folder of GPT-2's vocab.json and
merges.txt, as for mom-prep), 5% of the pages held out; or any
mom-prep output directory through --data. Every model: d_model 128, 4 heads, windows of 128
tokens, 8 windows per step, AdamW at lr 2e-3 (warmup + cosine to 2e-4), fp32, one rank,
trained by mom-train, one process per run, one run at a time.

  stage 1    donor: vanilla GPT-2 of 6 layers, N1 tokens.
  stage 2    each for N2 tokens from the donor (mom-convert to-hf, then from-hf):
             vanilla continued; MoM deep (1 bottom layer + a routed block of 4 + 4 modules,
             H = 6, K = 1, an anchor layer: the donor's parameters assembled 8 deep);
             MoM shallow (one block of 6 + 6 modules, H = 2, K = 2: a third of the depth).
             And MoM deep from scratch for N1 + N2 tokens.
  MoD        6 layers, every other one processing 12.5% of the tokens, from scratch for the
             donor's training FLOPs (more tokens, since each costs less), against the donor.
  MoE        3 layers of top-2 of 8 FFN experts against vanilla of 5 layers (the same FLOPs
             per token: 3 x (4 + 2 x 8) = 5 x 12 d^2), both from scratch for N1 tokens.
  modular    bench/modular.py's Modular Transformers comparison on the donor as teacher:
             modules of 2 and 3 layers trained once, assembled at 2x and 3x (search on
             held-out windows) against drop + fine-tune and a KD student, each trained
             on N2 / 4 tokens.

Columns: parameters; training FLOPs per token as mom-train logs them (the routing executed;
the mean over log windows); val loss and perplexity on the first --eval-windows val windows
(the same windows for every model); accuracy on the first 100 documents of mom_cloze, the
local lm-evaluation-harness task (mom-eval --tasks mom_cloze; 4 choices, chance 0.25; "n/a"
where mom-eval cannot run it); tokens/s (median of the log windows after the first); peak
memory of the rank's process; wall time of the mom-train process (start-up included).
Token counts scale with --budget: the default (1.0) took 42 minutes on an idle 2-core
machine, of which about 11 do not scale (start-ups, scoring, the harness).
--quick trains every arm for a few steps with every mom-ds command in this one process, so
that the start-up is paid once (its numbers mean nothing, the peak memory is this
process's, and the harness runs on the donor only). One line per paper claim says whether
it holds at this scale.
Writes OUT/repro.md, OUT/repro.json and OUT/repro.png; runs under OUT/runs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

from modular import (LAYERS, MICRO as MODULAR_MICRO, SEQ,  # noqa: E402
                     compression_row, eval_windows, forward_flops, modular_settings,
                     recipe as modular_recipe, write_outputs)
from mom_ds.evaluation import score  # noqa: E402
from mom_ds.cli.report import load_events  # noqa: E402
from mom_ds.config import DataConfig, RunConfig  # noqa: E402
from mom_ds.data import DataError, TokenizedDataset  # noqa: E402
from mom_ds.model import MoMConfig  # noqa: E402
from mom_ds.model.flops import flops_per_token  # noqa: E402
from mom_ds.model.presets import mixture_of_depths, mom, moe, vanilla  # noqa: E402
from mom_ds.model.weights_file import SUFFIX as WEIGHTS_SUFFIX  # noqa: E402
from mom_ds.modular.compress import load_student, search_windows  # noqa: E402
from mom_ds.checkpoints.loading import load_model  # noqa: E402

DOCS_DIR = Path("/usr/share/doc/python3.11/html")  # Debian's python3.11-doc
ROUTER_WIDTH = 64
MICRO = 8  # windows per step: twice bench/modular's steps for the same tokens
# Steps of MICRO x SEQ tokens at --budget 1 (N1 = N2 = STAGE_STEPS x 1024 tokens); the
# compression table trains bench/modular's batches of 16 windows for a quarter of N2.
STAGE_STEPS = 128
QUICK_STEPS = 2
HARNESS_DOCS = 100  # of mom_cloze's 400: a full pass costs about 90 s per model here
# "keeps quality" / "matches": val loss at most this much worse, relatively
QUALITY_TOLERANCE = 0.01
LR, MIN_LR = 2e-3, 2e-4


@dataclass
class Arm:
    """One trained model: a row of the table and a curve of the figure."""

    key: str
    label: str
    model: MoMConfig
    steps: int
    init: str = "random"  # random | donor (the donor's weights, cut by from-hf into model's layout)
    start_tokens: int = 0  # tokens its initial weights were trained on (the curves' offset)
    ablate: bool = False  # measure its routers' SKIP shares and silenced modules


@dataclass
class Settings:
    """How much of everything one invocation does (--quick: the least that runs each path)."""

    quick: bool  # also: every mom-ds command in this process, the harness on the donor only
    seed: int
    stage_steps: int  # N1 = N2 in steps
    d_model: int
    n_heads: int
    micro: int  # windows per step
    eval_points: int  # validation passes per run (the curves' points)
    eval_batches: int  # micro-batches per validation pass
    eval_windows: int  # val windows the table scores every model on
    search_windows: int  # held-out windows the modular assembly search scores on
    harness_limit: int  # mom_cloze documents
    compression_steps: int
    compressed_layers: tuple[int, ...]

    @property
    def step_tokens(self) -> int:
        return self.micro * SEQ


# --- the plan ---------------------------------------------------------------------------------
def settings_for(args: argparse.Namespace) -> Settings:
    if args.quick:  # a narrow model too: the GPT-2 head's arithmetic grows with d_model
        return Settings(True, args.seed, QUICK_STEPS, d_model=32, n_heads=2, micro=2,
                        eval_points=1, eval_batches=1, eval_windows=4, search_windows=4,
                        harness_limit=4, compression_steps=1, compressed_layers=(2,))
    stage = max(4, round(STAGE_STEPS * args.budget))
    return Settings(False, args.seed, stage, d_model=128, n_heads=4, micro=MICRO,
                    eval_points=8, eval_batches=2, eval_windows=args.eval_windows,
                    search_windows=64, harness_limit=HARNESS_DOCS,
                    # a quarter of N2's tokens in bench/modular's batches of 16 windows
                    compression_steps=max(2, stage * MICRO // (4 * MODULAR_MICRO)),
                    compressed_layers=(3, 2))  # 2x and 3x of the 6-layer donor


def plan(s: Settings, vocab: int) -> tuple[Arm, list[Arm], list[Arm]]:
    """(the donor, the arms that start from scratch, the arms that start from the donor)."""
    shape = dict(n_positions=SEQ, d_model=s.d_model, n_heads=s.n_heads, vocab_size=vocab)
    n, step_tokens = s.stage_steps, s.step_tokens
    deep = mom(n_bottom=1, n_attn_modules=4, n_ffn_modules=4, depth=6, top_k=1,
               anchor_layers=True, router_width=ROUTER_WIDTH, **shape)
    shallow = mom(n_attn_modules=LAYERS, n_ffn_modules=LAYERS, depth=2, top_k=2,
                  router_width=ROUTER_WIDTH, **shape)
    donor = Arm("donor", f"donor: vanilla {LAYERS}L", vanilla(LAYERS, **shape), n)
    mod = mixture_of_depths(LAYERS, capacity=0.125, every=2, **shape)
    scratch = [
        Arm("mom_scratch", "MoM deep, from scratch", deep, 2 * n),
        # equal training FLOPs: the donor's tokens x its FLOPs per token / MoD's
        Arm("mod", f"MoD {LAYERS}L (12.5%, every 2nd layer)", mod,
            round(n * flops_per_token(donor.model, SEQ) / flops_per_token(mod, SEQ))),
        Arm("moe", "MoE 3L (top-2 of 8 experts)",
            moe(3, n_experts=8, top_k=2, router_width=ROUTER_WIDTH, **shape), n),
        Arm("vanilla5", "vanilla 5L", vanilla(5, **shape), n),
    ]
    stage2 = [Arm("vanilla_continued", f"vanilla {LAYERS}L, continued", donor.model, n,
                  "donor", n * step_tokens),
              Arm("mom_deep", "MoM deep, two-stage", deep, n, "donor", n * step_tokens, True),
              Arm("mom_shallow", "MoM shallow, two-stage", shallow, n, "donor",
                  n * step_tokens)]
    return donor, scratch, stage2


def arm_recipe(arm: Arm, data: Path, runs: Path, s: Settings) -> Path:
    """The arm's mom-train recipe, written beside its run directory."""
    cfg = RunConfig(model=arm.model, data=DataConfig(data_dir=str(data), seq_len=SEQ,
                                                     seed=s.seed))
    t = cfg.train
    t.out_dir, t.max_steps, t.micro_batch_size = str(runs / arm.key), arm.steps, s.micro
    t.seed, t.lr, t.min_lr, t.warmup_steps = s.seed, LR, MIN_LR, max(1, min(50, arm.steps // 10))
    t.log_interval, t.eval_interval = max(1, arm.steps // 16), max(1, arm.steps // s.eval_points)
    t.eval_batches, t.ckpt_interval, t.keep_checkpoints = s.eval_batches, 0, 1
    t.precision = "fp32"
    path = runs / f"{arm.key}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


# --- the corpus -------------------------------------------------------------------------------
def corpus(args: argparse.Namespace, s: Settings) -> Path:
    """--data checked, or the Python documentation prepared into OUT/data."""
    data = Path(args.data) if args.data else prepare_docs(Path(args.out) / "data")
    try:
        train = TokenizedDataset(data, split="train", seq_len=SEQ)
        val = TokenizedDataset(data, split="val", seq_len=SEQ)
    except DataError as err:
        sys.exit(f"repro: --data {data}: {err}. Fix: pass a directory written by mom-prep.")
    need = s.eval_windows + s.search_windows
    if len(val) < need or len(train) < 1:
        sys.exit(f"repro: --data {data}: {len(train)} train and {len(val)} val windows of "
                 f"{SEQ} tokens; the suite scores {need} val windows. Fix: prepare more text "
                 f"or a larger --val-fraction with mom-prep.")
    return data


def prepare_docs(out: Path) -> Path:
    from data_prep.cli import main as mom_prep

    if not DOCS_DIR.is_dir():
        sys.exit(f"repro: no {DOCS_DIR}. Fix: apt-get install python3.11-doc, or pass --data "
                 f"with any mom-prep output directory.")
    # mom-prep is a no-op when OUT already holds this corpus with these settings; its own
    # error (e.g. no GPT-2 tokenizer offline) is printed by it
    if mom_prep(["--source", f"{DOCS_DIR}/**/*.html", "--tokenizer", "gpt2",
                 "--val-fraction", "0.05", "--out", str(out), "--quiet"]):
        sys.exit(f"repro: preparing {DOCS_DIR} failed (above). Fix: that error, or pass --data.")
    return out


# --- running mom-ds's commands ------------------------------------------------------------------
# Set in a mom-train process of this one (quick mode); a process started from here must
# be rank 0 of its own world, not of this one.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")


def command(module: str, argv: list[str], log: Path, here: bool = False) -> float:
    """Run a mom-ds command (`python -m module argv`), its output into `log`: in a process
    of its own, or with `here` in this process (its main(), as tests/train/test_configs_train.py
    runs mom-train). The wall time; RuntimeError naming the log when the command fails."""
    start = time.perf_counter()
    with open(log, "w") as out:
        if here:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    code = importlib.import_module(module).main(argv)
                except SystemExit as refused:  # argparse's way to refuse
                    code = refused.code
        else:
            env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
            code = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{module} {' '.join(argv[:2])} failed (exit {code}; {log}): "
                           + " / ".join(tail))
    return time.perf_counter() - start


def export_donor(donor_dir: Path, hf_dir: Path, s: Settings) -> None:
    shutil.rmtree(hf_dir, ignore_errors=True)  # to-hf writes only into a new directory
    command("mom_ds.cli.convert", ["to-hf", str(donor_dir), str(hf_dir)],
            hf_dir.parent / "donor-to-hf.log", s.quick)


def donor_weights(arm: Arm, hf_dir: Path, recipe: Path, s: Settings) -> Path:
    """The donor cut into the arm's layout (its recipe's model: section) by mom-convert
    from-hf; a vanilla layout is the identity map."""
    out = recipe.with_name(f"{arm.key}-init{WEIGHTS_SUFFIX}")
    command("mom_ds.cli.convert", ["from-hf", str(hf_dir), str(out), "--config", str(recipe)],
            recipe.with_name(f"{arm.key}-from-hf.log"), s.quick)
    return out


def train_arm(arm: Arm, data: Path, runs: Path, s: Settings, hf_dir: Optional[Path]) -> dict:
    """Train the arm with mom-train, then measure it: the row of the table."""
    recipe = arm_recipe(arm, data, runs, s)
    init = ["--train.init_from", str(donor_weights(arm, hf_dir, recipe, s))] \
        if arm.init == "donor" else []
    wall = command("mom_ds.cli.train", ["--config", str(recipe), "--overwrite", *init],
                   runs / f"{arm.key}.log", s.quick)
    run_dir = runs / arm.key
    harness = harness_accuracy(run_dir, s.harness_limit) \
        if not s.quick or arm.key == "donor" else None
    _, model, _ = load_model(run_dir)
    scored = score(model.eval(), eval_windows(data, s.eval_windows))
    row = {"key": arm.key, "label": arm.label, "init": arm.init, "steps": arm.steps,
           "tokens": arm.steps * s.step_tokens, "start_tokens": arm.start_tokens,
           "params": model.num_params(exclude_positions=False), "wall_s": wall,
           "mom_cloze_acc": harness, "val_loss": scored.loss, "val_ppl": scored.ppl,
           **logged_performance(run_dir)}
    if arm.ablate:
        row["routing"] = routing_redundancy(model, data, s.eval_windows, row["val_loss"])
    print(f"repro: {arm.key} done: val loss {row['val_loss']:.4f}, {wall:.0f} s", flush=True)
    return row


def harness_accuracy(run_dir: Path, limit: int) -> Optional[float]:
    """mom_cloze accuracy from mom-eval's results JSON; None when mom-eval cannot give it."""
    out = run_dir / "mom_cloze.json"
    argv = [str(run_dir), "--tasks", "mom_cloze", "--limit", str(limit), "--output", str(out)]
    try:
        command("mom_ds.cli.evaluate", argv, run_dir / "mom_cloze.log")
        return float(json.loads(out.read_text())["results"]["mom_cloze"]["acc,none"])
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        print(f"repro: mom_cloze n/a for {run_dir.name}: {str(err).strip()[:300]}", flush=True)
        return None


def logged_performance(run_dir: Path) -> dict:
    """What mom-train logged (TensorBoard events, read as mom-report reads them)."""
    s = load_events(run_dir).scalars
    rates = s["perf/tokens_per_s"][1]
    return {"tokens_per_s": statistics.median(rates[1:] if len(rates) > 1 else rates),
            "train_flops_per_token": float(s["perf/flops_per_token"][1].mean()),
            "peak_memory_gb": float(s["perf/memory_gb"][1].max()),
            "curve": {"step": s["eval/loss"][0].tolist(), "loss": s["eval/loss"][1].tolist()}}


# --- attention against FFN redundancy ------------------------------------------------------------
@torch.no_grad()
def routing_redundancy(model, data: Path, n_windows: int, loss: float) -> dict:
    """SKIP shares of the routers, and the val loss (`loss` as trained) with the least-used
    half of every pool's attention modules silenced against a quarter of its FFN modules
    (the paper's finding: 50% of attention modules can go, only 25% of FFN modules)."""
    rows = torch.from_numpy(TokenizedDataset(data, split="val", seq_len=SEQ)
                            .windows(range(min(16, n_windows))).astype("int64"))
    routing = model(rows[:, :-1]).routing
    attn = torch.stack([r.attn_counts.sum(0) for r in routing.blocks]).double()  # (blocks, A + 1)
    ffn = torch.stack([r.ffn_counts.sum(0) for r in routing.blocks]).double()
    c = model.config
    return {"attn_skip_share": float(attn[:, -1].sum() / attn.sum()),
            "ffn_skip_share": float(ffn[:, -1].sum() / ffn.sum()),
            "loss": loss,
            "loss_without_half_attention": silenced_loss(
                model, data, n_windows, "attn_modules", ("qkv", "proj"), attn[:, :-1],
                c.n_attn_modules // 2),
            "loss_without_quarter_ffn": silenced_loss(
                model, data, n_windows, "ffn_modules", ("proj",), ffn[:, :-1],
                max(1, c.n_ffn_modules // 4))}


def silenced_loss(model, data: Path, n_windows: int, pool: str, parts: tuple[str, ...],
                  usage: torch.Tensor, count: int) -> float:
    """Val loss with each block's `count` least-used modules of `pool` zeroed: an attention
    module with no Q/K/V and no output is exactly a SKIP (skip_in_attention zero), an FFN
    module with no output projection adds nothing."""
    silenced = copy.deepcopy(model)
    tensors = silenced.per_module_tensors()  # views: writing one writes the stacked pool
    for block, counts in enumerate(usage):
        for module in counts.argsort()[:count].tolist():
            for part in parts:
                for kind in ("weight", "bias"):
                    tensors[f"chunks.{block}.{pool}.{module}.{part}.{kind}"].zero_()
    return score(silenced.eval(), eval_windows(data, n_windows)).loss


# --- the modular compression table ---------------------------------------------------------------
def train_modular(runs: Path, data: Path, s: Settings) -> float:
    config = modular_settings(runs / "donor", s.compression_steps)
    recipe = modular_recipe(runs, "modular", None, s.compression_steps, data, **config)
    return command("mom_ds.cli.train", ["--config", str(recipe), "--overwrite", "--train.seed",
                                        str(s.seed), "--data.seed", str(s.seed)],
                   runs / "modular.log", s.quick)


def compression_rows(runs: Path, data: Path, s: Settings) -> list[dict]:
    """The teacher and, per compressed layer count, bench/modular.py's row: the searched modular
    assembly against the teacher with layers dropped (the best pattern on the held-out
    windows) fine-tuned alone and with distillation, for the modular run's tokens."""
    _, teacher, _ = load_model(runs / "donor")
    run_cfg, student, _ = load_student(runs / "modular")
    held_out = search_windows(run_cfg, s.search_windows)
    config = modular_settings(runs / "donor", s.compression_steps)

    scored_on = eval_windows(data, s.eval_windows)

    def loss(model) -> float:
        return score(model.eval(), scored_on).loss

    rows = [{"layers": LAYERS, "ratio": 1.0, "flops_per_token": forward_flops(teacher),
             "teacher": loss(teacher)}]
    for layers in s.compressed_layers:
        row, _ = compression_row(student, teacher, layers, held_out, data,
                                 s.compression_steps, config, loss, strategies=("search",))
        rows.append(row)
    return rows


# --- the claims -------------------------------------------------------------------------------
def claim(text: str, holds: bool, evidence: str) -> str:
    return f"{text}: {'HOLDS' if holds else 'DOES NOT HOLD'} at this scale ({evidence})."


def versus(rows: dict[str, dict], a: str, b: str, field: str = "val_loss",
           scale: float = 1.0, digits: int = 4) -> str:
    """'x vs y, +z%': one field of arms a and b, and a's difference relative to b."""
    x, y = rows[a][field], rows[b][field]
    return f"{x * scale:.{digits}f} vs {y * scale:.{digits}f}, {100 * (x / y - 1):+.2f}%"


def within_tolerance(rows: dict[str, dict], a: str, b: str) -> bool:
    return rows[a]["val_loss"] <= (1 + QUALITY_TOLERANCE) * rows[b]["val_loss"]


def fewer_flops(rows: dict[str, dict], a: str, b: str) -> bool:
    return rows[a]["train_flops_per_token"] < rows[b]["train_flops_per_token"]


def claims(rows: dict[str, dict], compression: list[dict]) -> list[str]:
    """One plain line per claim of the papers, with the numbers it rests on."""
    loss = {key: row["val_loss"] for key, row in rows.items()}
    flops = dict(field="train_flops_per_token", scale=1e-6, digits=2)
    tol = f"within {100 * QUALITY_TOLERANCE:g}% of the loss"
    r = rows["mom_deep"]["routing"]
    d_attn = r["loss_without_half_attention"] - r["loss"]
    d_ffn = r["loss_without_quarter_ffn"] - r["loss"]
    return [
        claim("MoM beats vanilla at equal parameters",
              loss["mom_deep"] < loss["vanilla_continued"],
              f"two-stage deep MoM, 8 assembled layers, against the donor continued, 6 layers: "
              f"val loss {versus(rows, 'mom_deep', 'vanilla_continued')}; millions of "
              f"parameters {versus(rows, 'mom_deep', 'vanilla_continued', 'params', 1e-6, 2)}"),
        claim("Shallow MoM keeps quality at fewer FLOPs",
              within_tolerance(rows, "mom_shallow", "vanilla_continued")
              and fewer_flops(rows, "mom_shallow", "vanilla_continued"),
              f"{tol}; two-stage shallow MoM against the donor continued: val loss "
              f"{versus(rows, 'mom_shallow', 'vanilla_continued')}; training MFLOPs/token "
              f"executed {versus(rows, 'mom_shallow', 'vanilla_continued', **flops)}"),
        claim("Attention modules are more redundant than FFN modules", d_attn <= d_ffn,
              f"two-stage deep MoM, each block's least-used modules silenced on the val "
              f"windows: half of the attention modules {d_attn:+.4f} loss, a quarter of the "
              f"FFN modules {d_ffn:+.4f}; the routers chose SKIP for "
              f"{100 * r['attn_skip_share']:.1f}% of attention and "
              f"{100 * r['ffn_skip_share']:.1f}% of FFN choices"),
        claim("MoD matches vanilla at fewer FLOPs per forward",
              within_tolerance(rows, "mod", "donor") and fewer_flops(rows, "mod", "donor"),
              f"{tol}; equal training FLOPs: val loss {versus(rows, 'mod', 'donor')}; "
              f"MFLOPs/token {versus(rows, 'mod', 'donor', **flops)}"),
        claim("MoE beats vanilla at equal FLOPs per token", loss["moe"] < loss["vanilla5"],
              f"val loss {versus(rows, 'moe', 'vanilla5')}"),
        claim("Two-stage training beats MoM from scratch at equal total tokens",
              loss["mom_deep"] < loss["mom_scratch"],
              f"val loss {versus(rows, 'mom_deep', 'mom_scratch')}"),
        modular_claim(compression[1:]),
    ]


def modular_claim(compressed: list[dict]) -> str:
    """Modular Transformers: one modular run, assembled per ratio, against a model trained
    for that ratio (layers dropped, then fine-tuned or distilled) on the same tokens."""
    evidence = "; ".join(
        f"{c['ratio']:.2g}x: {c['search']['loss']:.4f} vs {c['drop']['loss']:.4f} and "
        f"{c['kd']['loss']:.4f}" for c in compressed)
    holds = all(c["search"]["loss"] < min(c["drop"]["loss"], c["kd"]["loss"])
                for c in compressed)
    return claim("Modular Transformers compress better than dropping layers and fine-tuning "
                 "or distilling", holds,
                 f"val loss of the searched modular assembly vs the best drop pattern "
                 f"fine-tuned and the KD student, {evidence}")


# --- the outputs ------------------------------------------------------------------------------
COLUMNS = ("arm", "tokens", "params", "train MFLOPs/token", "train TFLOPs", "val loss",
           "val ppl", "mom_cloze acc", "tokens/s", "peak GB/rank", "wall s")
TABLES = (("Two-stage (stage 2: the same tokens from the donor)",
           ("donor", "vanilla_continued", "mom_deep", "mom_shallow", "mom_scratch")),
          ("MoD against vanilla at equal training FLOPs", ("donor", "mod")),
          ("MoE against vanilla at equal FLOPs per token", ("moe", "vanilla5")))


def table_row(r: dict) -> str:
    tokens = f"{r['start_tokens']:,} + {r['tokens']:,}" if r["start_tokens"] else f"{r['tokens']:,}"
    acc = "n/a" if r["mom_cloze_acc"] is None else f"{r['mom_cloze_acc']:.3f}"
    cells = [r["label"], tokens, f"{r['params'] / 1e6:.2f}M",
             f"{r['train_flops_per_token'] / 1e6:.2f}",
             f"{r['tokens'] * r['train_flops_per_token'] / 1e12:.2f}", f"{r['val_loss']:.4f}",
             f"{r['val_ppl']:.1f}", acc, f"{r['tokens_per_s']:,.0f}",
             f"{r['peak_memory_gb']:.2f}", f"{r['wall_s']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = [results["header"], ""]
    for title, keys in TABLES:
        lines += [f"**{title}**", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        lines += [table_row(rows[k]) for k in keys] + [""]
    teacher = results["compression"][0]["teacher"]
    lines += [f"**Modular compression of the donor** (teacher val loss {teacher:.4f}; "
              f"{results['compression_tokens']:,} tokens for each trained model)", "",
              "| ratio | layers | forward MFLOPs/token | modular (search) | drop + fine-tune "
              "| KD student |", "|---|---|---|---|---|---|"]
    for c in results["compression"][1:]:
        lines.append(f"| {c['ratio']:.2g}x | {c['layers']} | {c['flops_per_token'] / 1e6:.2f} | "
                     f"{c['search']['loss']:.4f} | {c['drop']['loss']:.4f} ({c['drop']['init']}) | "
                     f"{c['kd']['loss']:.4f} |")
    lines += ["", "**The papers' claims at this scale**", ""]
    lines += [f"- {claim}" for claim in results["claims"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))

    def curve(ax, key: str, per_flop: bool = False) -> None:
        r = rows[key]
        tokens = [r["start_tokens"] + step * results["step_tokens"] for step in r["curve"]["step"]]
        x = [t * r["train_flops_per_token"] / 1e12 for t in tokens] if per_flop \
            else [t / 1e6 for t in tokens]
        ax.plot(x, r["curve"]["loss"], marker=".", label=r["label"])

    for ax, (title, keys) in zip(axes, TABLES):
        per_flop = keys == ("donor", "mod")
        for key in keys:
            curve(ax, key, per_flop)
        ax.set(title=title, ylabel="val loss",
               xlabel="training TFLOPs" if per_flop else "tokens trained (M)")
        ax.legend(fontsize=8)
    ax = axes[3]
    comp = results["compression"]
    flops = [c["flops_per_token"] / 1e6 for c in comp]
    for key, label in (("search", "modular (search)"), ("drop", "drop + fine-tune"),
                       ("kd", "KD student")):
        ax.plot(flops, [comp[0]["teacher"]] + [c[key]["loss"] for c in comp[1:]], marker="o",
                label=label)
    ax.set(title="Compressing the donor", xlabel="forward MFLOPs per token", ylabel="val loss")
    ax.legend(fontsize=8)
    fig.suptitle(results["header"].splitlines()[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1.0,
                        help="scales every token count (default 1: 42 minutes on an idle "
                             "2-core machine)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps per stage, for CI (the numbers mean nothing)")
    parser.add_argument("--seed", type=int, default=1337,
                        help="model initialisation and window order of every mom-train run")
    parser.add_argument("--data", help="a mom-prep output directory (default: the Python "
                                       "documentation, prepared into OUT/data)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "repro"))
    parser.add_argument("--eval-windows", type=int, default=128,
                        help="val windows every model is scored on (default 128)")
    args = parser.parse_args(argv)
    if args.budget <= 0 or args.eval_windows < 1:
        parser.error("--budget and --eval-windows must be positive")
    return args


def header(args: argparse.Namespace, data: Path, donor: Arm, s: Settings, wall: float) -> str:
    meta = json.loads((data / "meta.json").read_text())
    return (f"bench/repro.py --budget {args.budget:g}{' --quick' if args.quick else ''} "
            f"--seed {args.seed}: {wall / 60:.1f} min on {os.cpu_count()} cores, torch "
            f"{torch.__version__}\n\n"
            f"Data: {meta['source']}, tokenizer {meta['tokenizer']['spec']}: "
            f"{meta['splits']['train']['n_tokens']:,} train tokens; val loss on the first "
            f"{s.eval_windows} val windows of {SEQ} tokens. Models: d_model {s.d_model}, "
            f"{s.n_heads} heads, routers of width {ROUTER_WIDTH}; {s.micro} windows "
            f"per step; N1 = N2 = {donor.steps * s.step_tokens:,} tokens ({donor.steps} steps). "
            f"Training FLOPs count the tied head (6 x vocab x d_model per token), most of "
            f"every model's arithmetic here.")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    s = settings_for(args)
    data = corpus(args, s)
    vocab = TokenizedDataset(data, split="train", seq_len=SEQ).vocab_size
    donor, scratch, stage2 = plan(s, vocab)
    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    hf_dir = runs / "donor-hf"
    rows = [train_arm(arm, data, runs, s, None) for arm in [donor, *scratch]]
    export_donor(runs / "donor", hf_dir, s)
    rows += [train_arm(arm, data, runs, s, hf_dir) for arm in stage2]
    train_modular(runs, data, s)
    results = {"rows": {r["key"]: r for r in rows},
               "compression": compression_rows(runs, data, s),
               "compression_tokens": s.compression_steps * MODULAR_MICRO * SEQ,
               "step_tokens": s.step_tokens, "settings": vars(args)}
    results["claims"] = claims(results["rows"], results["compression"])
    results["header"] = header(args, data, donor, s, time.perf_counter() - start)
    write_outputs(results, out, "repro", markdown, plot)
    print(f"repro: wrote {out / 'repro.md'}, {out / 'repro.json'} and {out / 'repro.png'}")
    for claim in results["claims"]:
        print(claim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
