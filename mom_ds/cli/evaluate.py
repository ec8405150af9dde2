"""mom-eval: validation loss, perplexity and FLOPs per token of a mom-train checkpoint
(one process).

  mom-eval runs/tiny [--split val] [--max-windows N] [--batch-size 8]
           [--depth H'] [--top-k K']
--depth / --top-k run a trained MoM with H' routing steps or K' modules per step (compute
chosen at inference); the FLOPs reported are those of the routing executed (forward only).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

import torch

from ..model.flops import flops_per_token
from ..model.mod_block import MoDRouting
from .args import positive_int
from .errors import run_command


@torch.no_grad()
def evaluate_model(model, data_dir: str, split: str, seq_len: int, batch_size: int,
                   max_windows: Optional[int]) -> dict[str, float]:
    """Mean cross-entropy (no balancing loss) over the split's windows in file order."""
    from ..data import TokenizedDataset

    data = TokenizedDataset(data_dir, split=split, seq_len=seq_len)
    n = len(data) if max_windows is None else min(max_windows, len(data))
    total, routing, mod_routing = 0.0, None, []
    for start in range(0, n, batch_size):
        rows = torch.from_numpy(data.windows(range(start, min(n, start + batch_size)))
                                .astype("int64"))
        out = model(rows[:, :-1], labels=rows[:, 1:])
        total += float(out.lm_loss) * len(rows)
        routing = out.routing if routing is None else [a + b for a, b in zip(routing, out.routing)]
        mod_routing.append(out.mod_routing)
    loss = total / n
    # the training convention counts forward + backward (6 per parameter); a forward is 1/3
    shares = [MoDRouting(torch.cat([m[i].selected.flatten() for m in mod_routing]), None)
              for i in range(len(mod_routing[0]))]
    flops = flops_per_token(model.config, seq_len, routing or None, shares or None) / 3
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "windows": n,
            "tokens": n * seq_len, "flops_per_token": flops}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mom-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its ckpt/ or a ckpt/step_* dir")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--data-dir", help="default: the run's data.data_dir")
    parser.add_argument("--max-windows", type=positive_int, help="default: the whole split")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="default: 8")
    parser.add_argument("--depth", type=positive_int, metavar="H'",
                        help="routing steps per routed block (default: as trained)")
    parser.add_argument("--top-k", type=positive_int, metavar="K'",
                        help="modules per token per step (default: as trained)")
    args = parser.parse_args(argv)
    return run_command("mom-eval", lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> int:
    from ..train.export import load_model

    run, model, step = load_model(args.checkpoint, args.depth, args.top_k)
    result = evaluate_model(model, args.data_dir or run.data.data_dir, args.split,
                            run.data.seq_len, args.batch_size, args.max_windows)
    compute = f" at depth {run.model.depth}, top-k {run.model.top_k}" if run.model.n_chunks else ""
    print(f"step {step}: {args.split} loss {result['loss']:.4f} ppl {result['ppl']:.2f} "
          f"({result['windows']} windows, {result['tokens']:,} tokens); "
          f"{result['flops_per_token'] / 1e6:.3f} MFLOPs/token forward{compute}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
