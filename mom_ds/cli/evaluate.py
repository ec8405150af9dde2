"""mom-eval: validation loss and perplexity of a mom-train checkpoint (one process).

  mom-eval runs/tiny [--split val] [--max-windows N] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

import torch


@torch.no_grad()
def evaluate_model(model, data_dir: str, split: str, seq_len: int, batch_size: int,
                   max_windows: Optional[int]) -> dict[str, float]:
    """Mean cross-entropy (no balancing loss) over the split's windows in file order."""
    from ..data import TokenizedDataset

    data = TokenizedDataset(data_dir, split=split, seq_len=seq_len)
    n = len(data) if max_windows is None else min(max_windows, len(data))
    total = 0.0
    for start in range(0, n, batch_size):
        rows = torch.from_numpy(data.windows(range(start, min(n, start + batch_size)))
                                .astype("int64"))
        out = model(rows[:, :-1], labels=rows[:, 1:])
        total += float(out.lm_loss) * len(rows)
    loss = total / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "windows": n,
            "tokens": n * seq_len}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mom-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its ckpt/ or a ckpt/step_* dir")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--data-dir", help="default: the run's data.data_dir")
    parser.add_argument("--max-windows", type=int, help="default: the whole split")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    from ..train.export import load_model

    run, model, step = load_model(args.checkpoint)
    result = evaluate_model(model, args.data_dir or run.data.data_dir, args.split,
                            run.data.seq_len, args.batch_size, args.max_windows)
    print(f"step {step}: {args.split} loss {result['loss']:.4f} ppl {result['ppl']:.2f} "
          f"({result['windows']} windows, {result['tokens']:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
