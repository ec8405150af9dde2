"""mom-generate: sample text from a mom-train checkpoint (KV-cached; one process, or the
ranks a launcher starts).

  mom-generate runs/tiny --prompt "def main(" [--max-new-tokens 200] [--temperature 0.8]
               [--top-k 50] [--top-p 0.95] [--seed 0] [--depth H'] [--top-k-modules K']
  torchrun --nproc-per-node 4 -m mom_ds.cli.generate runs/tiny --prompt "..."
               [--expert-parallel-size E]
Under a launcher (WORLD_SIZE > 1) the module pools are sharded over E ranks (default: all);
every rank runs the same prompt with the same seed, so they sample the same tokens, and
rank 0 prints them.
The tokenizer is the one the run was trained with (mom-train copies it into RUN/tokenizer/);
for a run from before that copy, the data's (meta.json in data.data_dir), which must be the
tokenizer the run recorded (data.fingerprint) unless --allow-data-change.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from ..model import ConfigError
from .args import (add_config_arguments, add_device_argument, check_overrides,
                   non_negative_float, parse_command_line, positive_int, print_config,
                   probability)
from .ranks import Ranks, close_ranks, load_on_ranks, open_ranks
from ..errors import run_command

# the checkpoint's model is what samples (any field that leaves the weights as trained);
# the tokenizer is the run's own (--data-dir names another)
GENERATE_READS = ("model",)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mom-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its ckpt/ or a ckpt/step_* dir")
    parser.add_argument("--prompt", help="the text to continue (required)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="default: 200")
    parser.add_argument("--temperature", type=non_negative_float, default=0.8,
                        help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="sample among the k likeliest tokens (default: all)")
    parser.add_argument("--top-p", type=probability, default=None,
                        help="nucleus sampling threshold in (0, 1] (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument("--data-dir", help="take the tokenizer of this prepared directory "
                                           "(default: the run's own)")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="use a tokenizer other than the run's (said on stderr)")
    add_device_argument(parser)
    parser.add_argument("--depth", type=positive_int, metavar="H'",
                        help="routing steps per routed block (default: as trained)")
    parser.add_argument("--top-k-modules", type=positive_int, metavar="K'",
                        help="modules per token per step (default: as trained; --top-k is "
                             "the sampler's)")
    parser.add_argument("--expert-parallel-size", type=positive_int, metavar="E",
                        help="under a launcher: ranks that share each module pool (default: "
                             "all of them)")
    add_config_arguments(parser, GENERATE_READS)
    args, overrides = parse_command_line(parser, argv)
    if args.prompt is None and not args.print_config:  # --print-config alone needs none
        parser.error("the following arguments are required: --prompt")
    return run_command("mom-generate", lambda: generate(parser, args, overrides))


def generate(parser: argparse.ArgumentParser, args: argparse.Namespace,
             overrides: list[str]) -> int:
    ranks = open_ranks("mom-generate", args.expert_parallel_size)
    try:
        return sampled(parser, args, overrides, ranks)
    finally:
        close_ranks(ranks)


def sampled(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: list[str],
            ranks: Ranks) -> int:
    from ..train.run_data import run_tokenizer

    run, model, _, where = load_on_ranks(
        ranks, args.checkpoint, args.depth, args.top_k_modules,
        check_overrides("mom-generate", overrides, GENERATE_READS), args.device)
    if args.print_config:
        return print_config(run.to_dict()) if ranks.printing else 0
    tokenizer = run_tokenizer("mom-generate", args.checkpoint, run, args.data_dir,
                              args.allow_data_change)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8
        raise ConfigError("--prompt is not valid UTF-8 text. Fix: pass the prompt as UTF-8.") \
            from None
    ids = torch.as_tensor(tokenizer.encode(args.prompt), dtype=torch.long, device=where)[None]
    if ids.numel() == 0:
        parser.error("the prompt encodes to no tokens")
    room = run.model.n_positions - ids.shape[1]
    if room < 1:
        parser.error(f"the prompt has {ids.shape[1]} tokens; the model holds "
                     f"{run.model.n_positions}")
    if args.max_new_tokens > room and ranks.printing:
        print(f"mom-generate: note: --max-new-tokens {args.max_new_tokens} capped to {room}: "
              f"the model holds {run.model.n_positions} positions and the prompt takes "
              f"{ids.shape[1]}", file=sys.stderr)
    # every rank makes the same calls and the same draws
    out = model.generate(ids, min(args.max_new_tokens, room), temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=tokenizer.info.eot_id,
                         generator=torch.Generator(device=where).manual_seed(args.seed))
    if ranks.printing:
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != tokenizer.info.eot_id]
        print(args.prompt + tokenizer.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
