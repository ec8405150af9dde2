"""mom-eval: validation loss, perplexity and FLOPs per token of a mom-train checkpoint
(one process, or the ranks a launcher starts), or lm-evaluation-harness tasks on it.

  mom-eval runs/tiny [--split val] [--max-windows N | --all] [--batch-size B] [--json]
           [--depth H'] [--top-k-modules K']
  torchrun --nproc-per-node 4 -m mom_ds.cli.evaluate runs/tiny [--expert-parallel-size E]
  mom-eval runs/tiny --tasks lambada_openai,hellaswag,arc_easy [--limit N] [--num-fewshot K]
           [--include-path DIR] [--output FILE.json]
By default it scores the run's validation windows (mom_ds/evaluation.py: train.eval_batches
x micro_batch_size x ranks windows of the seed-0 window order, in the micro-batches each
rank read them) with the same scoring function, so its loss is the run's last eval/loss
exactly (--json prints it at full precision); --max-windows N takes the first N windows of
that order, --all the whole split, in batches of --batch-size.
--depth / --top-k-modules run a trained MoM with H' routing steps or K' modules per step
(compute chosen at inference); the FLOPs reported are those of the routing executed (forward
only). Under a launcher (torchrun, deepspeed, srun: WORLD_SIZE > 1) the module pools are
sharded over E ranks (default: all) and each rank scores its share, as W training ranks do:
the windows of a W-rank run's validation; --max-windows / --all are rounded down to whole
rounds of batch-size x W windows.
--tasks runs the harness (pip install 'mom-ds[eval]'; hub tasks download their data) and
writes its results JSON to RUN/lm_eval/step_<N>_<tasks>.json. mom_cloze, built from the run's
own val split, needs no network; --include-path adds a directory of task YAMLs, whose
`!function` hooks run Python: name only directories you trust (nothing under RUN is read).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..errors import run_command
from ..model import ConfigError
from ..parallel.process_group import world_size_from_env
from .args import (add_config_arguments, add_device_argument, check_overrides, device,
                   parse_command_line, positive_int, print_config)
from .ranks import Ranks, close_ranks, load_on_ranks, open_ranks

# the checkpoint's config is what mom-eval scores with: its model (any field that leaves
# the weights as trained) and where its windows come from
EVAL_READS = ("model", "data.data_dir", "data.seq_len")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mom-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its ckpt/ or a ckpt/step_* dir")
    parser.add_argument("--split", default="val", choices=("train", "val"),
                        help="which split to score (default: val)")
    parser.add_argument("--data-dir", help="default: the run's data.data_dir")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="score data other than the run's (said on stderr)")
    parser.add_argument("--max-windows", type=positive_int,
                        help="default: as many as the run's validation scored")
    parser.add_argument("--all", action="store_true", help="score every window of the split")
    add_device_argument(parser)
    parser.add_argument("--batch-size", type=positive_int,
                        help="default: the run's micro_batch_size (harness: 8)")
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object (full precision)")
    parser.add_argument("--depth", type=positive_int, metavar="H'",
                        help="routing steps per routed block (default: as trained)")
    parser.add_argument("--top-k-modules", type=positive_int, metavar="K'",
                        help="modules per token per step (default: as trained)")
    parser.add_argument("--top-k", type=positive_int, dest="old_top_k", help=argparse.SUPPRESS)
    parser.add_argument("--expert-parallel-size", type=positive_int, metavar="E",
                        help="under a launcher: ranks that share each module pool (default: "
                             "all of them)")
    harness = parser.add_argument_group("lm-evaluation-harness")
    harness.add_argument("--tasks", type=task_list, help="comma-separated harness task names")
    harness.add_argument("--limit", type=positive_number,
                         help="documents per task (a fraction < 1: that share of each task)")
    harness.add_argument("--num-fewshot", type=int, metavar="K", help="default: the task's own")
    harness.add_argument("--include-path", action="append", default=[], metavar="DIR",
                         help="a directory of task YAMLs (repeatable); their !function "
                              "hooks run code: only directories you trust")
    harness.add_argument("--bootstrap-iters", type=int, default=100000, metavar="N",
                         help="resamples for the standard errors of metrics that are not "
                              "means, as lm_eval's own option (0: none, reported N/A)")
    harness.add_argument("--output",
                         help="results JSON (default: RUN/lm_eval/step_<N>_<tasks>.json)")
    add_config_arguments(parser, EVAL_READS)
    args, overrides = parse_command_line(parser, argv)
    if args.old_top_k is not None:  # the name until session 11; mom-generate's --top-k samples
        print("mom-eval: warning: --top-k is deprecated here; it is --top-k-modules (as in "
              "mom-generate, whose --top-k is the sampler's).", file=sys.stderr)
        args.top_k_modules = args.top_k_modules or args.old_top_k
    if not args.tasks and (args.limit or args.num_fewshot is not None or args.include_path
                           or args.output):
        parser.error("--limit, --num-fewshot, --include-path and --output go with --tasks")
    if args.tasks and not args.print_config:
        if world_size_from_env() > 1:
            parser.error("--tasks runs on one process (lm-evaluation-harness batches requests "
                         "itself); launch mom-eval without torchrun / deepspeed / srun")
        return run_command("mom-eval", lambda: run_tasks(args, overrides))
    return run_command("mom-eval", lambda: evaluate(args, overrides))


def task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("name at least one task, e.g. --tasks mom_cloze")
    return tasks


def positive_number(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return int(value) if value >= 1 and value == int(value) else value


def run_tasks(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..harness import HarnessRequest, run_harness

    request = HarnessRequest(args.checkpoint, args.tasks, args.limit, args.num_fewshot,
                             args.batch_size or 8, args.include_path, args.output,
                             str(device(args.device)), args.depth, args.top_k_modules,
                             args.allow_data_change,
                             check_overrides("mom-eval", overrides, EVAL_READS),
                             args.bootstrap_iters)
    out, results = run_harness(request)
    from lm_eval.utils import make_table  # installed: run_harness checked

    print(make_table(results))
    print(f"mom-eval: wrote {out}")
    return 0


def chosen_windows(args: argparse.Namespace, data, run, run_world: int, world: int):
    """What mom-eval scores on `world` ranks (module doc)."""
    from ..evaluation import Windows, first_windows, validation_windows

    t = run.train
    batch_size = args.batch_size or t.micro_batch_size
    if args.all or args.max_windows:
        count = len(data) if args.all else min(len(data), args.max_windows)
        if world > 1:
            whole = count // (batch_size * world) * batch_size * world
            if whole == 0:
                raise ConfigError(f"{count} windows do not fill one round of --batch-size "
                                  f"{batch_size} x {world} ranks. Fix: a smaller --batch-size "
                                  f"or --max-windows of at least {batch_size * world}.")
            count = whole
        return Windows(data, first_windows(data, count, batch_size).batches, world)
    if world > 1:  # the validation of a run on these ranks
        return validation_windows(data, t.eval_batches, batch_size, world)
    # the run's own validation: its windows in the micro-batches its ranks read
    windows = validation_windows(data, t.eval_batches, t.micro_batch_size, run_world)
    return windows if batch_size == t.micro_batch_size else windows.regrouped(batch_size)


def evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    ranks = open_ranks("mom-eval", args.expert_parallel_size)
    try:
        return scored(args, overrides, ranks)
    finally:
        close_ranks(ranks)


def scored(args: argparse.Namespace, overrides: list[str], ranks: Ranks) -> int:
    from ..data import TokenizedDataset
    from ..evaluation import score
    from ..train.run_data import check_data

    run, model, client, _ = load_on_ranks(ranks, args.checkpoint, args.depth,
                                          args.top_k_modules,
                                          check_overrides("mom-eval", overrides, EVAL_READS),
                                          args.device)
    if args.print_config:
        return print_config(run.to_dict()) if ranks.printing else 0
    data_dir = args.data_dir or run.data.data_dir
    check_data("mom-eval", args.checkpoint, run.data.fingerprint, data_dir,
               args.allow_data_change)
    data = TokenizedDataset(data_dir, split=args.split, seq_len=run.data.seq_len)
    windows = chosen_windows(args, data, run, int(client.get("world_size", 1)),
                             ranks.world_size)
    result = score(model, windows, config=model.config,
                   loss_chunk_tokens=run.train.loss_chunk_tokens, progress=ranks.printing)
    if not ranks.printing:
        return 0
    if args.json:
        print(json.dumps({"step": client["step"], "split": args.split, "loss": result.loss,
                          "ppl": result.ppl, "windows": result.windows,
                          "tokens": result.tokens, "flops_per_token": result.flops_per_token,
                          "ranks": ranks.world_size,
                          "expert_parallel_size": run.parallel.expert_parallel_size,
                          "parameters_on_rank0": sum(p.numel() for p in model.parameters())}))
        return 0
    compute = (f" at depth {run.model.depth}, {run.model.top_k} module(s) per step"
               if run.model.n_routed_blocks else "")
    print(f"step {client['step']}: {args.split} loss {result.loss:.4f} ppl {result.ppl:.2f} "
          f"({result.windows} windows, {result.tokens:,} tokens); "
          f"{result.flops_per_token / 1e6:.3f} MFLOPs/token forward{compute}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
