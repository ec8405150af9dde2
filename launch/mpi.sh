#!/bin/bash
# mom-train under mpirun (MPICH or Open MPI). Every rank runs
#   python -m mom_ds.launch_utils run --from mpi -- mom-train ARGS
# which finds rank, world size and master through mpi4py (DeepSpeed's own mpi_discovery,
# what deepspeed.init_distributed(auto_mpi_discovery=True) runs) before training starts.
#
#   launch/mpi.sh -np N [MPIRUN_ARGS...] -- MOM_TRAIN_ARGS...
#   launch/mpi.sh -np 2 -- --config configs/tiny.yaml
#   launch/mpi.sh -np 16 -ppn 8 -hosts node1,node2 -- --config configs/x.yaml     # MPICH
#   launch/mpi.sh -np 16 --hostfile hosts -x DS_ACCELERATOR -- --config ...      # Open MPI
#
# Needs mpi4py (pip install 'mom-ds[mpi]'); `pip install mpich mpi4py` brings a complete
# MPICH (mpirun included). MPICH forwards the whole environment to every rank; Open MPI
# forwards only what -x names. mpirun starts remote ranks over ssh (or the cluster's
# resource manager) and needs no deepspeed launcher. MASTER_PORT (default 29500) is the
# rendezvous port on rank 0's node.
#
# Signals: SIGTERM, SIGUSR1 or SIGINT to this script go to the ranks on this node, not to
# mpirun (`launch_utils supervise`); the ranks finish their step, save and exit 5.
set -euo pipefail

mpi_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do mpi_args+=("$1"); shift; done
[ $# -gt 1 ] || { echo "mpi.sh: usage: launch/mpi.sh -np N [MPIRUN_ARGS...] -- MOM_TRAIN_ARGS..." >&2; exit 2; }
shift

MPIRUN=${MPIRUN:-mpirun}
command -v "$MPIRUN" >/dev/null || { echo "mpi.sh: $MPIRUN not found. Fix: pip install mpich mpi4py (or load your cluster's MPI module)." >&2; exit 2; }
if "$MPIRUN" --version 2>&1 | grep -q "Open MPI" && [ "$(id -u)" = 0 ]; then
    # Open MPI refuses to start as root (containers usually run as root) unless told.
    echo "mpi.sh: Open MPI as root: setting OMPI_ALLOW_RUN_AS_ROOT=1" >&2
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

# ${mpi_args[@]+...}: bash < 4.4 treats an empty array as unset under `set -u`.
PYTHON=${MOM_PYTHON:-python}
exec "$PYTHON" -m mom_ds.launch_utils supervise -- \
    "$MPIRUN" ${mpi_args[@]+"${mpi_args[@]}"} "$PYTHON" -u -m mom_ds.launch_utils \
    run --from mpi -- mom-train "$@"
