"""How every command ends on an error it can explain: one line `mom-X: error: ...` on
stderr (from rank 0 only, in a multi-rank run) and a non-zero exit, no traceback. Set
MOM_DEBUG=1 to get the traceback instead. An error of any other kind is a bug and keeps
its traceback.

Exit codes: 2 bad input, 3 a diverged run, 4 a lost rank, 5 stopped on SIGTERM / SIGUSR1 /
SIGINT after saving a checkpoint (mom_ds/train/stopping.py: resume it; the Slurm script
requeues), 130 interrupted (Ctrl-C outside training, or a second one during it: nothing
saved)."""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional


def exit_code(err: BaseException) -> Optional[int]:
    """2 for bad input (config, data, checkpoint, file system), 3 for a diverged run, 4 for
    a lost rank (resume once its host is back), 5 for a run stopped by a signal after its
    checkpoint, None for anything else."""
    from data_prep.format import DataError

    from ..model.config import ConfigError  # imports torch: only once an error happened

    if isinstance(err, (ConfigError, DataError, OSError)):
        return 2
    # raised only by modules already imported: importing them here would cost torch
    checkpoint, health, peers, stopping = (sys.modules.get(f"mom_ds.train.{m}")
                                           for m in ("checkpoint", "health", "peers", "stopping"))
    if checkpoint is not None and isinstance(err, checkpoint.CheckpointError):
        return 2
    if health is not None and isinstance(err, health.DivergenceError):
        return 3
    if peers is not None and isinstance(err, peers.LostRankError):
        return peers.LOST_RANK_EXIT
    if stopping is not None and isinstance(err, stopping.Stopped):
        return stopping.STOPPED_EXIT
    return None


def run_command(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except KeyboardInterrupt:  # Ctrl-C where no handler catches it (mom-train's does)
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - re-raised unless explained
        code = exit_code(err)
        if code is None or os.environ.get("MOM_DEBUG"):
            raise
        if getattr(err, "report", os.environ.get("RANK", "0") == "0"):
            print(f"{prog}: error: {err}", file=sys.stderr)
        return code
