"""Per-rank entry point for launchers that want a script path rather than a module: the
deepspeed launcher's MPI runners put `-m` before their own helper, so `--module` breaks
them. Same as `python -m mom_ds.launch_utils ARGS`."""
import sys

from mom_ds.launch_utils import main

sys.exit(main(sys.argv[1:]))
