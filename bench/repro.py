"""The papers' comparisons at a scale where CPU-sized models learn, over seeds, side by side.

    python bench/repro.py [--budget 1] [--seeds 3] [--jobs 2] [--data DIR] [--out DIR]
    python bench/repro.py --quick            # every path for a few steps (CI)
    python bench/repro.py --plan gpt2-small  # the same comparisons as recipes for one 8-GPU node

Corpus: bench/corpus.py's (Debian's Linux kernel, Python and PostgreSQL documentation, the
Perl manual pages and Webster's 1913 dictionary; a BPE of 4,096 tokens trained by mom-prep on
the train split, 2% of the documents held out), prepared into OUT/corpus on first use; or
any mom-prep output directory through --data. Every model: d_model 128, 4 heads, windows of
128 tokens, 8 windows per step, AdamW at lr 2e-3 (warmup, cosine to 2e-4), fp32, one rank,
trained by mom-train, one process per run. With a 4,096-token vocabulary the tied head is
about a quarter of a 6-layer model's training FLOPs (the header states the share).

Per seed (initialisation and window order of every run; a stage-2 run draws its windows
in another order than its donor's, seed + 100, and the teacher in order 0, so that no run
replays windows another run of its comparison saw first):
  donor      vanilla GPT-2 of 6 layers, N1 tokens.
  stage 2    each for N2 tokens from the donor (mom-convert to-hf, then from-hf): vanilla
             continued; MoM deep (1 bottom layer + a routed block of 4 + 4 modules, H = 6,
             K = 1, an anchor layer: the donor's parameters assembled 8 deep); MoM shallow
             (one block of 6 + 6 modules, H = 2, K = 2).
  scratch    MoM deep from scratch for N1 + N2 tokens (two-stage against from-scratch).
  MoD        6 layers, every other one processing 12.5% of the tokens, for the donor's
             training FLOPs (more tokens, since each costs less).
  MoE        6 layers of top-1 of 8 FFN experts (the donor's FLOPs per token), N1 tokens.
  llama      the Llama-family pair from scratch, N1 tokens each: vanilla of 6 layers
             (RMSNorm, rotary positions, SwiGLU, 2 KV heads) and MoM deep of the same blocks;
             on the first LLAMA_SEEDS (2) seeds only, to keep the default run in 120 minutes.
  modular    the teacher (below) compressed to 4, 3 and 2 layers (1.5x, 2x, 3x): one modular
             run (modules of 2 and 3 layers; assembled by search on held-out windows and by
             the fixed rules coarsest and finest) against the teacher's layers dropped (the
             best pattern on the same windows) and fine-tuned, and the same start distilled.
             Each trains the same kind of parameters, the layers (embeddings, final norm and
             head stay the teacher's), on the same tokens in the same order.
The teacher is one vanilla 6-layer run of 2 x N1 tokens (the first seed). It has settled for
this comparison when more training can no longer be what the comparison measures: per seed,
the whole teacher is trained on that seed's compression tokens exactly as the drop and KD
baselines are (bench/modular.train_baseline, the layers, the same steps, rate and order), and
its val loss improves by less than SETTLED (1%) on every seed. The claim line gives that
gain per seed and, for the absolute picture, how much the teacher's own curve fell over its
last quarter (a cosine schedule's last quarter includes its anneal).

The verdicts: bench/repro_claims.py's RULE, printed with the table. The table: per arm the
mean val loss over seeds and its range, on --eval-windows val windows spread evenly over the
held-out documents (the same for every model; the assembly search scores the last
--search-windows, which the table never sees), beside the corpus's unigram perplexity
(train-split token frequencies, add-one smoothed, on the same windows). Tokens/s and peak
memory come from mom-train's logs; with --jobs 2 two runs share the two cores, one thread
each. A progress line per finished run gives the time left, estimated from the FLOP rate
so far. Writes OUT/repro.md, OUT/repro.json and OUT/repro.png; runs under OUT/runs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

import repro_claims as claims_rule  # noqa: E402
from repro_arms import (COMPRESSION_STEPS, MICRO, ROUTER_WIDTH, SEED_DIR,  # noqa: E402
                        STAGE1_STEPS, STAGE2_STEPS, TEACHER_DATA_SEED, TEACHER_FACTOR, Arm,
                        arms, data_seed)
from modular import (LAYERS, MICRO as MODULAR_MICRO, SEQ,  # noqa: E402
                     compression_row, modular_settings,
                     recipe as modular_recipe, train_baseline, write_outputs)
from mom_ds.checkpoints.loading import load_model  # noqa: E402
from mom_ds.cli.report import load_events  # noqa: E402
from mom_ds.config import DataConfig, RunConfig  # noqa: E402
from mom_ds.data import DataError, TokenizedDataset  # noqa: E402
from mom_ds.evaluation import Windows, row_windows, score  # noqa: E402
from mom_ds.model import MoMConfig  # noqa: E402
from mom_ds.model.flops import flops_per_token  # noqa: E402
from mom_ds.model.weights_file import SUFFIX as WEIGHTS_SUFFIX  # noqa: E402
from mom_ds.modular.compress import load_student, search_windows  # noqa: E402

COMPRESSED_LAYERS = (4, 3, 2)  # 1.5x, 2x and 3x of the 6-layer teacher
SETTLED = 0.01  # settled: trained like a baseline on the compression tokens, the teacher
# gains less than 1% on every seed
SHALLOW_FEWER_FLOPS = 0.15  # "shallow MoM keeps quality at >= 15% fewer FLOPs"
QUICK_STEPS = 2
LR, MIN_LR = 2e-3, 2e-4


@dataclass(frozen=True)
class Settings:
    """How much of everything one invocation does (--quick: the least that runs each path)."""

    quick: bool  # also: every mom-ds command in this process, one job
    seeds: tuple[int, ...]
    jobs: int
    d_model: int
    n_heads: int
    micro: int  # windows per step
    stage1_steps: int
    stage2_steps: int
    teacher_steps: int
    compression_steps: int  # of bench/modular's 16 windows
    compressed_layers: tuple[int, ...]
    eval_points: int  # validation passes per run (the curves' points)
    eval_batches: int  # micro-batches per validation pass
    eval_windows: int  # val windows the table scores every model on
    search_windows: int  # held-out windows the modular assembly search scores on

    @property
    def step_tokens(self) -> int:
        return self.micro * SEQ


def settings_for(args: argparse.Namespace) -> Settings:
    seeds = tuple(range(1, args.seeds + 1))
    if args.quick:  # a narrow model: every path, not the numbers
        return Settings(True, seeds, 1, d_model=32, n_heads=2, micro=2,
                        stage1_steps=QUICK_STEPS, stage2_steps=QUICK_STEPS,
                        teacher_steps=2 * QUICK_STEPS, compression_steps=1,
                        compressed_layers=(3, 2), eval_points=1, eval_batches=1,
                        eval_windows=4, search_windows=4)
    stage1 = max(4, round(STAGE1_STEPS * args.budget))
    return Settings(False, seeds, args.jobs, d_model=128, n_heads=4, micro=MICRO,
                    stage1_steps=stage1, stage2_steps=max(4, round(STAGE2_STEPS * args.budget)),
                    teacher_steps=TEACHER_FACTOR * stage1,
                    compression_steps=max(2, round(COMPRESSION_STEPS * args.budget)),
                    compressed_layers=COMPRESSED_LAYERS, eval_points=8, eval_batches=4,
                    eval_windows=args.eval_windows, search_windows=64)


# --- the recipes ------------------------------------------------------------------------------
def arm_recipe(arm: Arm, data: Path, run_dir: Path, seed: int, s: Settings,
               window_seed: Optional[int] = None) -> Path:
    """The arm's mom-train recipe, written beside its run directory: `seed` initialises,
    `window_seed` (default data_seed()) orders the windows."""
    window_seed = data_seed(arm, seed) if window_seed is None else window_seed
    cfg = RunConfig(model=arm.model, data=DataConfig(data_dir=str(data), seq_len=SEQ,
                                                     seed=window_seed))
    t = cfg.train
    t.out_dir, t.max_steps, t.micro_batch_size = str(run_dir), arm.steps, s.micro
    t.seed, t.lr, t.min_lr = seed, LR, MIN_LR
    t.warmup_steps = max(1, min(100, arm.steps // 10))
    t.log_interval = max(1, arm.steps // 32)
    t.eval_interval = max(1, arm.steps // s.eval_points)
    t.eval_batches, t.ckpt_interval, t.keep_checkpoints = s.eval_batches, 0, 1
    t.precision = "fp32"
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


# --- the corpus -------------------------------------------------------------------------------
def corpus(args: argparse.Namespace, s: Settings) -> Path:
    """--data checked, or bench/corpus.py's corpus prepared into OUT/corpus."""
    if args.data:
        data = Path(args.data).resolve()
    else:
        import corpus as debian_corpus

        data = debian_corpus.prepare(Path(args.out).resolve() / "corpus")
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


def scored_windows(data: Path, s: Settings) -> Windows:
    """--eval-windows val windows spread evenly over the held-out documents (the file is in
    source order, so the first windows would all be one source's), before the last
    --search-windows, in batches of 16."""
    val = TokenizedDataset(data, split="val", seq_len=SEQ)
    usable = len(val) - s.search_windows
    indices = sorted({round(i * (usable - 1) / max(1, s.eval_windows - 1))
                      for i in range(s.eval_windows)})
    return row_windows(torch.from_numpy(val.windows(indices).astype("int64")), 16)


def unigram_ppl(data: Path, windows: Windows) -> float:
    """Perplexity of the train split's token frequencies (add-one) on the scored targets."""
    train = TokenizedDataset(data, split="train", seq_len=SEQ)
    counts = np.bincount(np.asarray(train.tokens), minlength=train.vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    targets = windows.source[:, 1:].reshape(-1).numpy()
    return float(math.exp(-log_p[targets].mean()))


# --- running mom-ds's commands ------------------------------------------------------------------
# Set in a mom-train process of this one (quick mode); a process started from here must
# be rank 0 of its own world, not of this one.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")


def command(module: str, argv: list[str], log: Path, s: Settings) -> float:
    """Run a mom-ds command (`python -m module argv`), its output into `log`: in a process
    of its own (one thread when --jobs shares the cores), or in quick mode in this process
    (its main(), as tests/train/test_configs_train.py runs mom-train). The wall time;
    RuntimeError naming the log when the command fails."""
    start = time.perf_counter()
    with open(log, "w") as out:
        if s.quick:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    code = importlib.import_module(module).main(argv)
                except SystemExit as refused:  # argparse's way to refuse
                    code = refused.code
        else:
            env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
            if s.jobs > 1:
                env["OMP_NUM_THREADS"] = "1"
            code = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{module} {' '.join(argv[:2])} failed (exit {code}; {log}): "
                           + " / ".join(tail))
    return time.perf_counter() - start


def export_donor(seed_dir: Path, s: Settings) -> None:
    hf_dir = seed_dir / "donor-hf"
    shutil.rmtree(hf_dir, ignore_errors=True)  # to-hf writes only into a new directory
    command("mom_ds.cli.convert", ["to-hf", str(seed_dir / "donor"), str(hf_dir)],
            seed_dir / "donor-to-hf.log", s)


def donor_weights(arm: Arm, recipe: Path, seed: int, s: Settings) -> Path:
    """The seed's donor cut into the arm's layout (its recipe's model: section) by
    mom-convert from-hf, its routers drawn from the seed; a vanilla layout is the identity
    map."""
    out = recipe.with_name(f"{arm.key}-init{WEIGHTS_SUFFIX}")
    command("mom_ds.cli.convert", ["from-hf", str(recipe.parent / "donor-hf"), str(out),
                                   "--config", str(recipe), "--seed", str(seed)],
            recipe.with_name(f"{arm.key}-from-hf.log"), s)
    return out


def train(recipe: Path, log: Path, s: Settings, *extra: str) -> float:
    return command("mom_ds.cli.train", ["--config", str(recipe), "--overwrite", *extra], log, s)


def logged_performance(run_dir: Path) -> dict:
    """What mom-train logged (TensorBoard events, read as mom-report reads them)."""
    scalars = load_events(run_dir).scalars
    rates = scalars["perf/tokens_per_s"][1]
    return {"tokens_per_s": statistics.median(rates[1:] if len(rates) > 1 else rates),
            "train_flops_per_token": float(scalars["perf/flops_per_token"][1].mean()),
            "peak_memory_gb": float(scalars["perf/memory_gb"][1].max()),
            "curve": {"step": scalars["eval/loss"][0].tolist(),
                      "loss": scalars["eval/loss"][1].tolist()}}


# --- attention against FFN redundancy ------------------------------------------------------------
@torch.no_grad()
def routing_redundancy(model, held_out: torch.Tensor, windows: Windows, loss: float) -> dict:
    """SKIP shares of the routers on the `held_out` rows (the assembly search's: never
    scored), and the val loss on `windows` (`loss` as trained) with the half of every pool's
    attention modules least used there silenced against a quarter of its FFN modules (the
    paper's finding: 50% of attention modules can go, only 25% of FFN modules)."""
    routing = model(held_out[:, :-1]).routing
    attn = torch.stack([r.attn_counts.sum(0) for r in routing.blocks]).double()  # (blocks, A + 1)
    ffn = torch.stack([r.ffn_counts.sum(0) for r in routing.blocks]).double()
    c = model.config
    return {"attn_skip_share": float(attn[:, -1].sum() / attn.sum()),
            "ffn_skip_share": float(ffn[:, -1].sum() / ffn.sum()),
            "loss": loss,
            "loss_without_half_attention": silenced_loss(
                model, windows, "attn_modules", ("qkv", "proj"), attn[:, :-1],
                c.n_attn_modules // 2),
            "loss_without_quarter_ffn": silenced_loss(
                model, windows, "ffn_modules", ("proj",), ffn[:, :-1],
                max(1, c.n_ffn_modules // 4))}


def silenced_loss(model, windows: Windows, pool: str, parts: tuple[str, ...],
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
    return score(silenced.eval(), windows).loss


# --- the runs as tasks --------------------------------------------------------------------------
@dataclass
class Task:
    """One unit of work: `run()` once every task named in `after` has finished;
    it returns what the progress line says of it."""

    name: str
    flops: float  # estimated, for the time left
    run: Callable[[], Optional[str]]
    after: frozenset[str] = frozenset()


@dataclass
class Progress:
    """The progress line: runs done, and the time left at the FLOP rate so far."""

    total_flops: float
    total_tasks: int
    start: float = field(default_factory=time.perf_counter)
    done_flops: float = 0.0
    done_tasks: int = 0

    def finished(self, task: Task, what: str) -> None:
        """run_tasks calls it from its own thread only."""
        self.done_flops += task.flops
        self.done_tasks += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed * (self.total_flops - self.done_flops) / max(self.done_flops, 1.0)
        print(f"repro: [{self.done_tasks}/{self.total_tasks}] {task.name}: {what}; "
              f"{elapsed / 60:.1f} min so far, about {left / 60:.0f} min left", flush=True)


def run_tasks(tasks: list[Task], jobs: int,
              finished: Callable[[Task, str], None] = lambda task, what: None) -> None:
    """Run the tasks, at most `jobs` at a time, each after the tasks it needs, in list order
    otherwise, telling `finished` what each one returned; the first failure is raised once
    the tasks running beside it end (nothing new starts). One job runs them in this thread:
    mom-train in this process (quick mode) installs signal handlers, which only the main
    thread may."""
    missing = {n for t in tasks for n in t.after} - {t.name for t in tasks}
    assert not missing, f"tasks wait for unknown tasks {missing}"
    pending, done = list(tasks), set()

    def ready() -> list[Task]:
        return [t for t in pending if t.after <= done]

    def end(task: Task, what: Optional[str]) -> None:
        done.add(task.name)
        finished(task, what or "done")

    if jobs == 1:
        while pending:
            task = ready()[0]
            pending.remove(task)
            end(task, task.run())
        return
    running = {}
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for task in ready()[:jobs - len(running)]:
                pending.remove(task)
                running[pool.submit(task.run)] = task
            finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished_now:
                end(running.pop(future), future.result())  # raises the task's error


@dataclass
class Suite:
    """One invocation: its settings, data, scored windows and the results as they arrive."""

    s: Settings
    data: Path
    runs: Path
    windows: Windows
    held_out: torch.Tensor  # the assembly search's val rows: choose, never score
    arms: list[Arm]
    rows: dict = field(default_factory=dict)  # arm key -> {"seeds": {seed: measures}, ...}
    compression: dict = field(default_factory=dict)  # seed -> rows
    teacher: dict = field(default_factory=dict)

    def seed_dir(self, seed: int) -> Path:
        path = self.runs / SEED_DIR.format(seed)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def loss(self, model) -> float:
        return score(model.eval(), self.windows).loss

    def tokens(self, steps: int) -> int:
        return steps * self.s.step_tokens

    # --- the tasks ---
    def tasks(self) -> list[Task]:
        """Per seed: the donor, its export, the arms; the teacher; per seed the modular run
        and its compression table. Donors, their exports and the teacher first (the most
        waits on them), then the rest by estimated FLOPs, most first."""
        s, seq = self.s, SEQ
        teacher_model = self.arms[0].model
        tasks = [Task("teacher", self.tokens(s.teacher_steps) * flops_per_token(teacher_model, seq),
                      self.train_teacher)]
        for seed in s.seeds:
            for arm in (a for a in self.arms if a.runs_with(seed)):
                after = frozenset({f"{seed}/donor-hf"} if arm.init == "donor" else ())
                tasks.append(Task(f"{seed}/{arm.key}",
                                  self.tokens(arm.steps) * flops_per_token(arm.model, seq),
                                  lambda a=arm, sd=seed: self.train_arm(a, sd), after))
            tasks.append(Task(f"{seed}/donor-hf", 0.0,
                              lambda sd=seed: export_donor(self.seed_dir(sd), s),
                              frozenset({f"{seed}/donor"})))
            tasks.append(Task(f"{seed}/modular", self.compression_flops(teacher_model),
                              lambda sd=seed: self.compress(sd), frozenset({"teacher"})))
        first = [t for t in tasks if t.name == "teacher" or t.name.endswith(("/donor", "/donor-hf"))]
        # then the longest first, so that the run does not end on one long task beside an
        # idle core
        return first + sorted((t for t in tasks if t not in first), key=lambda t: -t.flops)

    def compression_flops(self, teacher_model: MoMConfig) -> float:
        """The modular run (the teacher's forward + the student's training), per layer
        count the fine-tuned and the distilled model, and the teacher trained as they are."""
        teacher = flops_per_token(teacher_model, SEQ)
        tokens = self.s.compression_steps * MODULAR_MICRO * SEQ
        per_layer = teacher / LAYERS  # close enough for a time estimate
        baselines = sum(2 * per_layer * n + teacher / 3 for n in self.s.compressed_layers)
        return tokens * (teacher * 4 / 3 + baselines + teacher)

    def train_arm(self, arm: Arm, seed: int) -> str:
        run_dir = self.seed_dir(seed) / arm.key
        recipe = arm_recipe(arm, self.data, run_dir, seed, self.s)
        init = ["--train.init_from", str(donor_weights(arm, recipe, seed, self.s))] \
            if arm.init == "donor" else []
        wall = train(recipe, run_dir.with_suffix(".log"), self.s, *init)
        _, model, _ = load_model(run_dir)
        measured = {"val_loss": self.loss(model), "wall_s": wall,
                    **logged_performance(run_dir)}
        measured["val_ppl"] = math.exp(measured["val_loss"])
        if arm.ablate:
            measured["routing"] = routing_redundancy(model, self.held_out, self.windows,
                                                     measured["val_loss"])
        row = self.rows.setdefault(arm.key, {
            "label": arm.label, "init": arm.init, "steps": arm.steps,
            "tokens": self.tokens(arm.steps), "start_tokens": arm.start_tokens,
            "params": model.num_params(exclude_positions=False), "seeds": {}})
        row["seeds"][seed] = measured
        return f"val loss {measured['val_loss']:.4f}, {wall:.0f} s"

    def train_teacher(self) -> str:
        arm = Arm("teacher", f"vanilla {LAYERS}L teacher", self.arms[0].model,
                  self.s.teacher_steps)
        run_dir = self.runs / "teacher"
        wall = train(arm_recipe(arm, self.data, run_dir, self.s.seeds[0], self.s,
                                TEACHER_DATA_SEED), run_dir.with_suffix(".log"), self.s)
        _, model, _ = load_model(run_dir)
        curve = logged_performance(run_dir)["curve"]
        self.teacher.update(val_loss=self.loss(model), wall_s=wall, curve=curve,
                            tokens=self.tokens(arm.steps), late_fall=late_fall(curve))
        return f"val loss {self.teacher['val_loss']:.4f}, {wall:.0f} s"

    def compress(self, seed: int) -> str:
        """The seed's modular run, then per layer count bench/modular.py's row: the modular
        assemblies against the best drop pattern fine-tuned and distilled, each training
        the layers only, on the modular run's tokens in its window order."""
        seed_dir, s = self.seed_dir(seed), self.s
        config = modular_settings(self.runs / "teacher", s.compression_steps)
        recipe = modular_recipe(seed_dir, "modular", None, s.compression_steps, self.data,
                                **config)
        train(recipe, seed_dir / "modular.log", s, "--train.seed", str(seed),
              "--data.seed", str(seed))
        _, teacher, _ = load_model(self.runs / "teacher")
        _, student, _ = load_student(seed_dir / "modular")
        rows = []
        for layers in s.compressed_layers:
            row, _ = compression_row(student, teacher, layers, self.held_out, self.data,
                                     s.compression_steps, config, self.loss, seed=seed,
                                     layers_only=True)
            rows.append(row)
        self.compression[seed] = rows
        continued = train_baseline(copy.deepcopy(teacher), teacher, self.data,
                                   s.compression_steps, False, config, seed, layers_only=True)
        self.teacher.setdefault("continued", {})[seed] = self.loss(continued)
        return "; ".join(f"{r['ratio']:.2g}x search {r['search']['loss']:.4f}, drop "
                         f"{r['drop']['loss']:.4f}, KD {r['kd']['loss']:.4f}" for r in rows)


def late_fall(curve: dict) -> float:
    """The teacher's val loss fall over its last quarter of steps, relative (its eval passes
    nearest 75% and 100% of the run)."""
    steps, losses = curve["step"], curve["loss"]
    quarter = min(range(len(steps)), key=lambda i: abs(steps[i] - 0.75 * steps[-1]))
    return 1 - losses[-1] / losses[quarter]


def settled(teacher: dict) -> tuple[dict[int, float], bool]:
    """seed -> the relative val loss gain of the teacher trained on that seed's compression
    tokens as the baselines are, and whether every gain is below SETTLED."""
    gains = {seed: 1 - loss / teacher["val_loss"]
             for seed, loss in sorted(teacher["continued"].items())}
    return gains, all(g < SETTLED for g in gains.values())


# --- the claims -------------------------------------------------------------------------------
def per_seed(rows: dict) -> dict[int, dict[str, float]]:
    """seed -> arm key -> val loss, for the arms trained with that seed."""
    seeds = sorted(set().union(*(r["seeds"] for r in rows.values())))
    return {seed: {key: r["seeds"][seed]["val_loss"] for key, r in rows.items()
                   if seed in r["seeds"]} for seed in seeds}


def mean_flops(rows: dict, key: str) -> float:
    return statistics.fmean(m["train_flops_per_token"] for m in rows[key]["seeds"].values())


def claims(results: dict) -> list[str]:
    """One line per claim of the papers: the verdict by the rule, and the numbers."""
    c = claims_rule
    rows = results["rows"]
    loss = per_seed(rows)

    def versus(text: str, a: str, b: str, context: str, tolerance: float = 0.0,
               condition: Optional[tuple[bool, str]] = None) -> str:
        """Arm a's val loss against arm b's, per seed; within `tolerance` counts as a win."""
        gaps = c.loss_gap(loss, a, b)
        return c.line(text, [g - tolerance for g in gaps],
                      f"{context}val loss {c.describe(gaps, percent=True)}", condition)

    def fewer(a: str, b: str, by: float = 0.0) -> tuple[bool, str]:
        fa, fb = mean_flops(rows, a), mean_flops(rows, b)
        return fa <= (1 - by) * fb, (f"training MFLOPs/token {fa / 1e6:.2f} vs {fb / 1e6:.2f} "
                                     f"({100 * (fa / fb - 1):+.1f}%)")

    tol = f"within {100 * c.QUALITY_TOLERANCE:g}%"
    routing = [m["routing"] for m in rows["mom_deep"]["seeds"].values()]
    redundancy = [(r["loss_without_half_attention"] - r["loss"])
                  - (r["loss_without_quarter_ffn"] - r["loss"]) for r in routing]
    params = rows["mom_deep"]["params"] / rows["vanilla_continued"]["params"] - 1
    return [
        versus("MoM beats vanilla at equal parameters", "mom_deep", "vanilla_continued",
               f"two-stage MoM deep against the donor continued (parameters "
               f"{100 * params:+.1f}%), "),
        versus(f"Shallow MoM keeps quality ({tol}) at >= {100 * SHALLOW_FEWER_FLOPS:g}% fewer "
               f"FLOPs", "mom_shallow", "vanilla_continued",
               "two-stage, against the donor continued, ", c.QUALITY_TOLERANCE,
               fewer("mom_shallow", "vanilla_continued", SHALLOW_FEWER_FLOPS)),
        c.line("Attention modules are more redundant than FFN modules", redundancy,
               f"MoM deep, each block's least-used half of the attention modules silenced "
               f"against a quarter of its FFN modules, loss increase of the first minus the "
               f"second {c.describe(redundancy)}; SKIP chosen for "
               f"{100 * statistics.fmean(r['attn_skip_share'] for r in routing):.1f}% of "
               f"attention and {100 * statistics.fmean(r['ffn_skip_share'] for r in routing):.1f}%"
               f" of FFN choices"),
        versus(f"MoD matches vanilla ({tol}) at equal training FLOPs, with fewer FLOPs per "
               f"forward", "mod", "donor", "", c.QUALITY_TOLERANCE, fewer("mod", "donor")),
        versus("MoE beats vanilla at equal FLOPs per token", "moe", "donor", ""),
        versus("Two-stage training beats MoM from scratch at equal total tokens", "mom_deep",
               "mom_scratch", ""),
        modular_claim(results["compression"], results["teacher"]),
        versus("MoM beats vanilla at equal parameters with Llama-family blocks", "llama_mom",
               "llama_vanilla", "from scratch, "),
    ]


def modular_claim(compression: dict, teacher: dict) -> str:
    """Modular Transformers: per ratio, the searched assembly against the better of drop +
    fine-tune and KD, per seed; decided only where every ratio agrees."""
    c = claims_rule
    seeds = sorted(compression)
    ratios = [r["ratio"] for r in compression[seeds[0]]]
    words, evidence = [], []
    for i, ratio in enumerate(ratios):
        diffs = [c.relative(compression[s][i]["search"]["loss"],
                            min(compression[s][i]["drop"]["loss"], compression[s][i]["kd"]["loss"]))
                 for s in seeds]
        words.append(c.verdict(diffs))
        evidence.append(f"{ratio:.2g}x {words[-1]}, {c.describe(diffs, percent=True)}")
    gains, done = settled(teacher)
    settled_note = (f"the teacher trained on the compression tokens as the baselines are: val "
                    f"loss {', '.join(f'{100 * -g:+.2f}%' for g in gains.values())} by seed, "
                    f"{'settled' if done else 'NOT settled'} by the {100 * SETTLED:g}% "
                    f"criterion; its own curve fell {100 * teacher['late_fall']:.2f}% over its "
                    f"last quarter")
    text = ("Modular Transformers compress better than dropping layers and fine-tuning or "
            "distilling")
    return (f"{text}: {c.combined(words)} at this scale (searched assembly against the better "
            f"baseline, val loss: {'; '.join(evidence)}; {settled_note}).")


# --- the outputs ------------------------------------------------------------------------------
COLUMNS = ("arm", "tokens", "params", "train MFLOPs/token", "val loss: mean [range]",
           "val ppl", "tokens/s", "peak GB", "wall s")
TABLES = (("Two-stage (stage 2: the same tokens from the donor) and from scratch",
           ("donor", "vanilla_continued", "mom_deep", "mom_shallow", "mom_scratch")),
          ("MoD at the donor's training FLOPs; MoE at its FLOPs per token",
           ("donor", "mod", "moe")),
          ("Llama-family blocks, from scratch", ("llama_vanilla", "llama_mom")))


def spread(values: list[float], digits: int = 4) -> str:
    return f"{statistics.fmean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def seed_values(row: dict, key: str) -> list[float]:
    return [m[key] for m in row["seeds"].values()]


def table_row(r: dict, seeds: int) -> str:
    """`seeds`: the run's; a row trained on fewer says how many."""
    label = r["label"] + (f" ({len(r['seeds'])} seeds)" if len(r["seeds"]) < seeds else "")
    tokens = f"{r['start_tokens']:,} + {r['tokens']:,}" if r["start_tokens"] else f"{r['tokens']:,}"
    flops = statistics.fmean(seed_values(r, "train_flops_per_token"))
    cells = [label, tokens, f"{r['params'] / 1e6:.2f}M", f"{flops / 1e6:.2f}",
             spread(seed_values(r, "val_loss")),
             f"{statistics.fmean(seed_values(r, 'val_ppl')):.1f}",
             f"{statistics.median(seed_values(r, 'tokens_per_s')):,.0f}",
             f"{max(seed_values(r, 'peak_memory_gb')):.2f}",
             f"{statistics.fmean(seed_values(r, 'wall_s')):.0f}"]
    return "| " + " | ".join(cells) + " |"


def compression_values(results: dict, i: int, key: str) -> list[float]:
    return [rows[i][key]["loss"] for rows in results["compression"].values()]


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = [results["header"], ""]
    seeds = max(len(r["seeds"]) for r in rows.values())
    for title, keys in TABLES:
        lines += [f"**{title}**", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        lines += [table_row(rows[k], seeds) for k in keys] + [""]
    t = results["teacher"]
    first = next(iter(results["compression"].values()))
    lines += [f"**Modular compression of the teacher** (val loss {t['val_loss']:.4f} after "
              f"{t['tokens']:,} tokens, {spread(list(t['continued'].values()))} trained on "
              f"the compression tokens as the baselines are; {results['compression_tokens']:,} "
              f"tokens for each compressed model; val loss mean [range] over seeds)", "",
              "| ratio | layers | forward MFLOPs/token | modular search | modular coarsest | "
              "modular finest | drop + fine-tune | KD student |", "|---|---|---|---|---|---|---|---|"]
    for i, c in enumerate(first):
        cells = [spread(compression_values(results, i, k))
                 for k in ("search", "coarsest", "finest", "drop", "kd")]
        lines.append(f"| {c['ratio']:.2g}x | {c['layers']} | {c['flops_per_token'] / 1e6:.2f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "**The papers' claims at this scale**", "", claims_rule.RULE, ""]
    lines += [f"- {claim}" for claim in results["claims"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))

    def band(ax, key: str, per_flop: bool = False) -> None:
        r = rows[key]
        runs = list(r["seeds"].values())
        tokens = [r["start_tokens"] + step * results["step_tokens"] for step in runs[0]["curve"]["step"]]
        flops = statistics.fmean(seed_values(r, "train_flops_per_token"))
        x = [t * flops / 1e12 for t in tokens] if per_flop else [t / 1e6 for t in tokens]
        losses = np.array([m["curve"]["loss"] for m in runs])
        line, = ax.plot(x, losses.mean(0), label=r["label"])
        ax.fill_between(x, losses.min(0), losses.max(0), alpha=0.25, color=line.get_color())

    for ax, (title, keys) in zip(axes, TABLES):
        per_flop = "mod" in keys
        for key in keys:
            band(ax, key, per_flop)
        ax.set(title=title, ylabel="val loss (mom-train's eval passes)",
               xlabel="training TFLOPs" if per_flop else "tokens trained (M)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    ax = axes[3]
    first = next(iter(results["compression"].values()))
    flops = [c["flops_per_token"] / 1e6 for c in first]
    for key, label in (("search", "modular (search)"), ("drop", "drop + fine-tune"),
                       ("kd", "KD student")):
        values = [compression_values(results, i, key) for i in range(len(first))]
        mean = [statistics.fmean(v) for v in values]
        err = [[m - min(v) for m, v in zip(mean, values)], [max(v) - m for m, v in zip(mean, values)]]
        ax.errorbar(flops, mean, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(results["teacher"]["val_loss"], color="grey", linestyle=":", label="teacher")
    ax.set(title="Compressing the teacher (range over seeds)", xlabel="forward MFLOPs per token",
           ylabel="val loss")
    ax.title.set_fontsize(9)
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
                        help="scales every token count (default 1)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per arm (default 3; 2 with --quick)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at once, one thread each when more than one (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps per stage in this process, for CI (the "
                             f"numbers mean nothing)")
    parser.add_argument("--data", help="a mom-prep output directory (default: bench/corpus.py's "
                                       "corpus, prepared into OUT/corpus)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "repro"))
    parser.add_argument("--eval-windows", type=int, default=256,
                        help="val windows every model is scored on (default 256)")
    parser.add_argument("--plan", choices=("gpt2-small",),
                        help="write the recipes and launch commands of the same comparisons "
                             "for one 8-GPU node into OUT/plan instead of training")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 3)
    if args.budget <= 0 or args.eval_windows < 1 or args.seeds < 1 or args.jobs < 1:
        parser.error("--budget, --eval-windows, --seeds and --jobs must be positive")
    return args


def header(args: argparse.Namespace, suite: Suite, wall: float, unigram: float) -> str:
    s, data = suite.s, suite.data
    meta = json.loads((data / "meta.json").read_text())
    donor = suite.arms[0]
    head = 6 * donor.model.vocab_size * s.d_model / flops_per_token(donor.model, SEQ)
    flags = (f"--budget {args.budget:g} --seeds {len(s.seeds)} --jobs {s.jobs} --eval-windows "
             f"{args.eval_windows}{' --data ' + Path(args.data).name if args.data else ''}")
    return (f"bench/repro.py {flags}{' --quick' if s.quick else ''}: {wall / 60:.1f} min on "
            f"{os.cpu_count()} cores, torch {torch.__version__}\n\n"
            f"Data: {meta['source']}; tokenizer {meta['tokenizer']['spec']}: "
            f"{meta['splits']['train']['n_tokens']:,} train tokens, "
            f"{meta['splits']['val']['n_tokens']:,} held out. Val loss on {suite.windows.count} "
            f"val windows of {SEQ} tokens spread over the held-out documents, where the "
            f"unigram model of the train split has perplexity {unigram:.1f} (loss "
            f"{math.log(unigram):.3f}). Models: d_model {s.d_model}, {s.n_heads} heads, "
            f"routers of width {ROUTER_WIDTH}; {s.micro} windows per step; N1 = "
            f"{suite.tokens(s.stage1_steps):,} tokens, N2 = {suite.tokens(s.stage2_steps):,}; "
            f"seeds {', '.join(map(str, s.seeds))}. The tied head is {100 * head:.0f}% of the "
            f"donor's training FLOPs.")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.plan:
        from repro_plan import write_plan

        return write_plan(args.plan, Path(args.out) / "plan", args.seeds)
    start = time.perf_counter()
    s = settings_for(args)
    data = corpus(args, s)
    vocab = TokenizedDataset(data, split="train", seq_len=SEQ).vocab_size
    shape = dict(n_positions=SEQ, d_model=s.d_model, n_heads=s.n_heads, vocab_size=vocab)
    out = Path(args.out).resolve()  # mom-ds's commands run in the repository
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if s.jobs > 1:
        torch.set_num_threads(1)  # this process scores and compresses beside a mom-train
    held_out = search_windows(RunConfig(data=DataConfig(data_dir=str(data), seq_len=SEQ)),
                              s.search_windows)
    suite = Suite(s, data, runs, scored_windows(data, s), held_out,
                  arms(shape, LAYERS, s.stage1_steps, s.stage2_steps, s.step_tokens))
    tasks = suite.tasks()
    progress = Progress(sum(t.flops for t in tasks), len(tasks))
    print(f"repro: {len(tasks)} runs, {progress.total_flops / 1e12:,.0f} TFLOPs of training, "
          f"{s.jobs} at a time", flush=True)
    run_tasks(tasks, s.jobs, progress.finished)
    unigram = unigram_ppl(data, suite.windows)
    results = {"rows": suite.rows, "teacher": suite.teacher, "compression": suite.compression,
               "compression_tokens": s.compression_steps * MODULAR_MICRO * SEQ,
               "step_tokens": s.step_tokens, "unigram_ppl": unigram, "rule": claims_rule.RULE,
               "settings": vars(args)}
    results["claims"] = claims(results)
    results["header"] = header(args, suite, time.perf_counter() - start, unigram)
    write_outputs(results, out, "repro", markdown, plot)
    print(f"repro: wrote {out / 'repro.md'}, {out / 'repro.json'} and {out / 'repro.png'}")
    for claim in results["claims"]:
        print(claim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
