"""mom-convert: move weights between mom-train checkpoints, plain PyTorch files and HF GPT-2.

  mom-convert fp32 CKPT OUT.pt               mom-train checkpoint -> one fp32 state dict
                                             ({"model_config", "state_dict", "step"})
  mom-convert to-hf CKPT OUT_DIR             vanilla-preset checkpoint -> GPT2LMHeadModel dir
  mom-convert from-hf HF_DIR OUT.pt [--config configs/X.yaml]
                                             GPT-2 donor -> MoM (two-stage init: the recipe's
                                             model layout; no --config: the vanilla preset)
Start a run from OUT.pt with `mom-train --train.init_from OUT.pt`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from .errors import run_command


def save_weights(path: str | Path, model_config: dict, state_dict: dict, step: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model_config": model_config, "state_dict": state_dict, "step": step}, tmp)
    tmp.replace(path)  # a killed conversion leaves no half file under the real name


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mom-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fp32", help="mom-train checkpoint -> one fp32 state dict")
    p.add_argument("checkpoint", help="run directory, its ckpt/ or a ckpt/step_* dir")
    p.add_argument("out", help="the .pt file to write (for --train.init_from)")
    p = sub.add_parser("to-hf", help="vanilla-preset checkpoint -> HF GPT-2 directory")
    p.add_argument("checkpoint", help="run directory, its ckpt/ or a ckpt/step_* dir")
    p.add_argument("out", help="the directory to write (must be new or empty)")
    p = sub.add_parser("from-hf", help="HF GPT-2 donor -> MoM weights for --train.init_from")
    p.add_argument("donor", help="GPT2LMHeadModel directory (or hub name, with the network)")
    p.add_argument("out", help="the .pt file to write")
    p.add_argument("--config", help="recipe whose model: section is the target layout")
    args = parser.parse_args(argv)
    return run_command("mom-convert", lambda: convert(args))


def convert(args: argparse.Namespace) -> int:
    from ..model.hf import from_hf_gpt2, to_hf_gpt2
    from ..train.export import consolidated_state_dict, load_model, require_whole_model

    if args.command == "fp32":
        run, weights, client = consolidated_state_dict(args.checkpoint)
        require_whole_model(run, args.checkpoint)
        save_weights(args.out, run.model.to_dict(), weights, int(client["step"]))
    elif args.command == "to-hf":
        _, model, _ = load_model(args.checkpoint)
        to_hf_gpt2(model, args.out)
    else:
        from ..config import load_run_config

        layout = load_run_config(args.config).model if args.config else None
        model = from_hf_gpt2(args.donor, layout=layout)
        save_weights(args.out, model.config.to_dict(), model.state_dict(), 0)
    print(f"mom-convert {args.command}: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
