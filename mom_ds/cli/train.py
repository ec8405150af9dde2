"""mom-train: pre-train a MoM (or any preset) with DeepSpeed.

  mom-train --config configs/tiny.yaml [--deepspeed ds_configs/zero2.json] [--resume [auto]]
            [--section.key value ...]

Run it directly for one process, or under a launcher for many:
  deepspeed --num_accelerators 2 $(which mom-train) --config configs/tiny.yaml

SIGTERM, SIGUSR1 or SIGINT: every rank finishes its step, a checkpoint is saved, exit 5;
continue with --resume. A second SIGINT exits at once without saving.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from ..config import ConfigError, RunConfig, load_run_config
from .args import (EVERY_FIELD, add_config_arguments, check_overrides, notes_to_stderr,
                   parse_command_line, positive_int, print_config)
from ..errors import BAD_INPUT, exit_code, run_command


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="mom-train", description=__doc__)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (overrides parallel.deepspeed)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=resume_value,
                        metavar="auto",
                        help="continue from the latest complete checkpoint in train.out_dir; "
                             "`--resume auto`: continue when a checkpoint was ever completed "
                             "there, else start fresh (a failed first attempt's logs are moved "
                             "to train.out_dir/previous/)")
    parser.add_argument("--resume-from", metavar="TAG",
                        help="continue from this checkpoint of train.out_dir/ckpt (e.g. "
                             "step_000400) instead of the latest (implies --resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in train.out_dir (its checkpoints, "
                             "metrics, TensorBoard events and config.yaml)")
    parser.add_argument("--stop-after", type=positive_int, metavar="STEP",
                        help="save a checkpoint and exit after this step (the schedule still "
                             "runs to train.max_steps; continue later with --resume)")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="resume on data other than the checkpoint's (logged in the run)")
    parser.add_argument("--verbose", action="store_true",
                        help="show DeepSpeed's own start-up lines")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    add_config_arguments(parser, EVERY_FIELD)
    return parse_command_line(parser, argv)


def resume_value(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"{value!r}: the only value is auto (a checkpoint is "
                                         f"chosen with --resume-from TAG)")
    return value


# Set by srun / mpirun for each of several tasks; without RANK & co. every task would train
# alone, all writing into the same run directory.
TASK_COUNT_VARS = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def single_process_env() -> None:
    """Without a launcher, make this process rank 0 of 1 (DeepSpeed otherwise probes MPI)."""
    if "WORLD_SIZE" in os.environ:
        return
    for var in TASK_COUNT_VARS:
        if int(os.environ.get(var, "1")) > 1:
            raise ConfigError(f"started as one of {os.environ[var]} tasks ({var}) without "
                              f"RANK / WORLD_SIZE: each task would train alone. Fix: launch "
                              f"through launch/slurm/submit.sh or launch/mpi.sh (or export "
                              f"RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT per task).")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def load_config(args: argparse.Namespace, overrides: list[str]) -> RunConfig:
    overrides = check_overrides("mom-train", overrides, EVERY_FIELD)
    if args.deepspeed:
        overrides = [*overrides, "--parallel.deepspeed", args.deepspeed]
    return load_run_config(args.config, overrides)


def resume_or_start(out_dir: Path) -> bool:
    """--resume auto: resume (True) once a checkpoint was ever completed in out_dir - the
    resume takes the newest that verifies, or refuses naming the damage; nothing is
    deleted. Else start fresh (False): what a first attempt that never completed a
    checkpoint left (its logs, unfinished tags) is moved by rank 0 to out_dir/previous/."""
    from ..checkpoints.format import MANIFEST
    from ..train.preflight import RUN_FILES
    from ..checkpoints.published import LATEST

    ckpt = out_dir / "ckpt"
    if (ckpt / LATEST).exists() or any(ckpt.glob(f"step_*/{MANIFEST}")):
        return True
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if os.environ.get("RANK", "0") == "0":  # the other ranks decide the same from the files
        note = "nothing to set aside"
        if found:
            dest = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
            dest.mkdir(parents=True, exist_ok=True)
            for name in found:
                os.replace(out_dir / name, dest / name)
            note = f"the previous attempt's {', '.join(found)} moved to {dest}"
        print(f"mom-train: --resume auto: no complete checkpoint in {ckpt}: starting fresh "
              f"({note})", flush=True)
    return False


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    return run_command("mom-train", lambda: train(args, overrides))


def train(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.print_config:
        with notes_to_stderr(True):
            run = load_config(args, overrides)
        return print_config(run.to_dict())
    if args.resume_from:
        args.resume = True
    single_process_env()
    if not args.verbose:
        from ..parallel.process_group import choose_accelerator_quietly

        choose_accelerator_quietly()
    run = load_config(args, overrides)
    from ..parallel.process_group import world_size_from_env
    from ..train.preflight import StartCheck, check_run_dir, preflight

    def checks() -> dict:  # every rank, before any process group
        if run.modular.enabled:  # its model: section becomes the teacher's, checked first
            from ..modular.run import resolve_teacher

            resolve_teacher(run)
        ds_config = preflight(run)
        check_run_dir(run, resume=bool(args.resume), overwrite=args.overwrite)
        if args.resume == "auto":
            args.resume = resume_or_start(Path(run.train.out_dir))
        return ds_config

    # alone: one message, exit 2, before torch starts; one of several: agreed on at start
    start = StartCheck.of(checks, lambda err: exit_code(err) == BAD_INPUT, world_size_from_env())
    from ..modular.run import build_student  # imports torch/deepspeed: after the checks
    from ..train.session import run_training
    from ..train.stopping import REQUEST

    with REQUEST.installed():  # a signal stops the run at a step boundary, saved
        run_training(run, start, resume=args.resume, stop_after=args.stop_after,
                     overwrite=args.overwrite, resume_from=args.resume_from,
                     verbose=args.verbose, allow_data_change=args.allow_data_change,
                     build=build_student if run.modular.enabled else None)
    return 0

if __name__ == "__main__":
    sys.exit(main())
