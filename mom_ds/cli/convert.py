"""mom-convert: move weights between mom-train checkpoints, plain PyTorch files and Hugging
Face models (GPT-2; Llama, SmolLM, TinyLlama, Mistral, Qwen2).

  mom-convert fp32 CKPT OUT.safetensors      mom-train checkpoint -> one fp32 weights file
                                             (the model config and step in its metadata)
  mom-convert to-hf CKPT OUT_DIR [--data-dir D]
                                             any checkpoint -> Hugging Face directory: a vanilla
                                             preset as GPT2LMHeadModel / LlamaForCausalLM /
                                             Qwen2ForCausalLM, every other model with
                                             its modeling code (trust_remote_code=True); with
                                             the tokenizer of the run's data
  mom-convert from-hf HF_DIR OUT.safetensors [--config configs/X.yaml] [--model.key VALUE ...]
                                             GPT-2 or Llama-family donor -> MoM (two-stage
                                             init, or upcycling where the pools outnumber the
                                             donor's layers: the recipe's
                                             model layout; no --config: the vanilla preset;
                                             --model.* overrides either; the routers drawn
                                             from --seed, default 0), or a to-hf export of
                                             any model back as it is
Start a run from OUT.safetensors with `mom-train --train.init_from OUT.safetensors`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .args import (add_config_arguments, check_overrides, notes_to_stderr, parse_command_line,
                   print_config)
from ..errors import run_command

# from-hf builds a model config (a layout for the donor's layers), nothing else
FROM_HF_READS = ("model",)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mom-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fp32", help="mom-train checkpoint -> one fp32 state dict")
    p.add_argument("checkpoint", help="run directory, its ckpt/ or a ckpt/step_* dir")
    p.add_argument("out", help="the .safetensors file to write (for --train.init_from)")
    p = sub.add_parser("to-hf", help="checkpoint -> Hugging Face model directory")
    p.add_argument("checkpoint", help="run directory, its ckpt/ or a ckpt/step_* dir")
    p.add_argument("out", help="the directory to write (must be new or empty)")
    p.add_argument("--data-dir", help="where the tokenizer comes from (default: the run's "
                                      "own copy in RUN/tokenizer/, else data.data_dir)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="take --data-dir's tokenizer even where it is not the run's")
    p = sub.add_parser("from-hf", help="HF GPT-2 / Llama / Mistral / Qwen2 donor -> MoM weights "
                                          "for --train.init_from")
    p.add_argument("donor", help="*ForCausalLM directory (or hub name, with the network)")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--config", help="recipe whose model: section is the target layout")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the parameters the donor does not hold (routers): the same "
                        "command writes the same file (default 0)")
    add_config_arguments(p, FROM_HF_READS)
    args, overrides = parse_command_line(parser, argv)
    return run_command("mom-convert", lambda: convert(args, overrides))


def convert(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..model.weights_file import save_weights
    from ..checkpoints.loading import consolidated_state_dict, load_model, require_whole_model

    check_overrides(f"mom-convert {args.command}", overrides,
                    FROM_HF_READS if args.command == "from-hf" else ())
    if args.command == "from-hf":
        return from_hf(args, overrides)
    if args.command == "fp32":
        run, weights, client = consolidated_state_dict(args.checkpoint)
        require_whole_model(run, args.checkpoint)
        save_weights(args.out, run.model.to_dict(), weights, int(client["step"]))
    else:
        from ..model.hf_export import check_target, to_hf

        check_target(Path(args.out))  # before the checkpoint is read
        run, model, _ = load_model(args.checkpoint)
        to_hf(model, args.out, hf_tokenizer(args, run))
    print(f"mom-convert {args.command}: wrote {args.out}")
    return 0


def from_hf(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from ..model import ConfigError
    from ..model.hf import from_hf
    from ..config import stored_model_config
    from ..model.hf_export import is_mom_export, read_exported
    from ..model.weights_file import save_weights

    if is_mom_export(args.donor):
        if args.config or overrides:
            raise ConfigError(f"{args.donor} is a mom-ds export, which imports as it is. "
                              f"Fix: drop --config and the --model.* overrides (they cut a "
                              f"donor into a layout).")
        config, weights = read_exported(args.donor, stored_model_config)
        if args.print_config:
            return print_config({"model": config.to_dict()})
        save_weights(args.out, config.to_dict(), weights, 0)
    else:
        with notes_to_stderr(args.print_config):
            layout = donor_layout(args, overrides)
        if args.print_config:
            return print_config({"model": layout.to_dict()})
        # the routers are drawn at the model's build, from torch's global generator: seeded
        # here, so that a two-stage run is reproducible from its command
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = from_hf(args.donor, layout=layout)
        save_weights(args.out, model.config.to_dict(), model.state_dict(), 0)
    print(f"mom-convert from-hf: wrote {args.out}")
    return 0


def donor_layout(args: argparse.Namespace, overrides: list[str]):
    """The model a donor becomes: the recipe's model section, else the donor's vanilla
    preset, changed by the --model.* overrides (the donor's own config alone, never its
    weights, is read for the vanilla preset)."""
    from ..config import load_run_config, parse_overrides
    from ..model import MoMConfig
    from ..model.hf import vanilla_config

    if args.config:
        return load_run_config(args.config, overrides).model
    vanilla = vanilla_config(args.donor).to_dict()
    return MoMConfig.from_dict({**vanilla, **parse_overrides(overrides).get("model", {})})


def hf_tokenizer(args: argparse.Namespace, run):
    """The tokenizer the run was trained with (its own copy in RUN/tokenizer/, or a data
    directory checked against the run's record), in transformers' form."""
    from data_prep.tokenizer_export import transformers_tokenizer
    from ..data import DataError
    from ..train.run_data import run_tokenizer

    try:
        return transformers_tokenizer(run_tokenizer("mom-convert", args.checkpoint, run,
                                                    args.data_dir, args.allow_data_change))
    except OSError as err:
        raise DataError(f"the run's tokenizer cannot be read ({err}). Fix: pass --data-dir "
                        f"with the mom-prep directory the run was trained on.") from None


if __name__ == "__main__":
    sys.exit(main())
