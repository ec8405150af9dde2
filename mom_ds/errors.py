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

BAD_INPUT = 2
DIVERGED = 3
LOST_RANK = 4
STOPPED = 5
INTERRUPTED = 130


def exit_code(err: BaseException) -> Optional[int]:
    """The exit code an error explains, None for a bug. Each error class says its own code
    (its `exit_code` attribute: 2 bad input, 3 a diverged run, 4 a lost rank, 5 stopped by a
    signal), so this module imports none of them; an OSError (a file system's refusal) is
    bad input too."""
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code
    return BAD_INPUT if isinstance(err, OSError) else None


def run_command(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except KeyboardInterrupt:  # Ctrl-C where no handler catches it (mom-train's does)
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # noqa: BLE001 - re-raised unless explained
        code = exit_code(err)
        if code is None or os.environ.get("MOM_DEBUG"):
            raise
        if getattr(err, "report", os.environ.get("RANK", "0") == "0"):
            print(f"{prog}: error: {err}", file=sys.stderr)
        return code
