"""mom-assemble: a plain model of any offered compression ratio from one modular run,
without training (Modular Transformers, docs/modular.md).

  mom-assemble RUN --list                          the ratios RUN offers
  mom-assemble RUN --ratio 2 [--strategy coarsest|finest|search] [--out DIR]
               [--teacher SRC] [--search-windows 64]
  mom-assemble RUN --layers 6 ...                  the same, by assembled layers

ratio = teacher layers / assembled layers. coarsest and finest are fixed rules; search
scores every assembly of that many layers on the last --search-windows windows of the val split
and keeps the best. DIR (default RUN/assembled/ratio_<R>x_<strategy>) is a run directory
of the vanilla preset: mom-eval DIR, mom-generate DIR, mom-convert to-hf DIR OUT.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..model import ConfigError
from .args import (add_config_arguments, check_overrides, parse_command_line, positive_int,
                   print_config)
from ..errors import run_command

# the modules and the teacher are the run's; the held-out windows of --strategy search (and
# the data the assembled run records) can come from elsewhere
ASSEMBLE_READS = ("data.data_dir", "data.seq_len")


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="mom-assemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a modular run directory, its ckpt/ or a ckpt/step_* dir")
    what = parser.add_mutually_exclusive_group()  # one of them, unless --print-config
    what.add_argument("--ratio", type=float, help="compression ratio: teacher / assembled layers")
    what.add_argument("--layers", type=positive_int, help="assembled layers")
    what.add_argument("--list", action="store_true", help="print the offered ratios and exit")
    parser.add_argument("--strategy", default="coarsest",
                        choices=("coarsest", "finest", "search"))
    parser.add_argument("--out", help="output run directory")
    parser.add_argument("--teacher", help="the teacher's source, if it moved since training")
    parser.add_argument("--search-windows", type=positive_int, default=64,
                        help="val windows that score each candidate of --strategy search")
    add_config_arguments(parser, ASSEMBLE_READS)
    args, overrides = parse_command_line(parser, argv)
    if args.ratio is None and args.layers is None and not args.list and not args.print_config:
        parser.error("one of the arguments --ratio --layers --list is required")
    return args, overrides


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    return run_command("mom-assemble", lambda: assemble(args, overrides))


def assemble(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..config import with_overrides
    from ..modular.compress import (assembled_model, choose, default_out, load_student,
                                    search_windows, write_assembled)
    from ..modular.assembly import layers_for_ratio, describe, offered_layer_counts, with_layers

    check_overrides("mom-assemble", overrides, ASSEMBLE_READS)
    run, student, step = load_student(args.run, args.teacher)
    run = with_overrides(run, overrides)
    if args.print_config:
        return print_config(run.to_dict())
    n_layers, grains = student.n_layers, student.granularities
    if args.list:
        print(f"{args.run}: {n_layers}-layer teacher, modules of granularities "
              f"{list(grains)}")
        for layers in offered_layer_counts(n_layers, grains):
            print(f"  --ratio {n_layers / layers:.3g}  ({layers} layers, "
                  f"{len(with_layers(n_layers, grains, layers))} assemblies)")
        return 0
    if args.layers is not None:
        if args.layers not in offered_layer_counts(n_layers, grains):
            raise ConfigError(f"--layers {args.layers}: no assembly has that many layers. Fix: "
                              f"use one of {offered_layer_counts(n_layers, grains)}.")
        layers = args.layers
    else:
        layers = layers_for_ratio(args.ratio, n_layers, grains)
    rows = search_windows(run, args.search_windows) if args.strategy == "search" else None
    assembly, scored = choose(student, layers, args.strategy, rows)
    for loss, candidate in scored[:5]:
        print(f"  held-out loss {loss:.4f}  {describe(candidate)}")
    out = args.out or default_out(args.run, n_layers / layers, args.strategy)
    write_assembled(run, assembled_model(student, assembly), assembly, step, out, args.strategy)
    print(f"mom-assemble: {n_layers}/{layers} = {n_layers / layers:.3g}x ({args.strategy}): "
          f"{describe(assembly)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
