"""Keep the size line of every recipe in configs/*.yaml true: parameter count, training
FLOPs per token and tokens per step are computed from the recipe, never typed by hand.

  python -m mom_ds.recipes configs/*.yaml          rewrite the generated lines
  python -m mom_ds.recipes --check configs/*.yaml  exit 1 if any is stale (used by tests)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import load_run_config

MARK = "# [generated] "


def size_lines(path: Path) -> list[str]:
    from .model.flops import describe

    run = load_run_config(path)
    t = run.train
    windows = t.micro_batch_size * t.grad_accum_steps
    model = f"the model is the teacher's ({run.modular.teacher}), only its modules train" \
        if run.modular.enabled else describe(run.model, run.data.seq_len)
    return [f"{MARK}{model}",
            f"{MARK}{windows * run.data.seq_len:,} tokens per step per rank "
            f"({t.micro_batch_size} x {t.grad_accum_steps} windows of {run.data.seq_len})",
            f"{MARK}by: python -m mom_ds.recipes configs/*.yaml"]


def annotated(path: Path) -> str:
    """The file with its generated lines replaced, placed after the leading comments."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith(MARK)]
    head = 0
    while head < len(lines) and lines[head].startswith("#"):
        head += 1
    return "\n".join(lines[:head] + size_lines(path) + lines[head:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mom_ds.recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for path in args.recipes:
        text = annotated(path)
        if text != path.read_text():
            stale.append(path)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"stale generated lines in {[str(p) for p in stale]}; run python -m "
              f"mom_ds.recipes on them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
