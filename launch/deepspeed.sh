#!/bin/bash
# mom-train through the deepspeed launcher, on this node or on the hosts of a hostfile.
#
#   launch/deepspeed.sh [DEEPSPEED_LAUNCHER_ARGS...] -- MOM_TRAIN_ARGS...
#
#   launch/deepspeed.sh --num_gpus 8 -- --config configs/tiny.yaml          # one node
#   launch/deepspeed.sh --hostfile hosts -- --config configs/tiny.yaml      # many nodes
#   launch/deepspeed.sh --hostfile hosts --include "node1:0,1@node2" -- ...  # a subset
#   launch/deepspeed.sh --hostfile hosts --exclude "node2:3" -- ...          # minus slots
#
# hostfile: one `HOST slots=N` line per node (N = processes there, one per GPU). It is
#   checked strictly before launching: DeepSpeed itself runs on this node only, with a
#   warning, when the path does not exist (DeepSpeed #5221), and accepts `slots=4x`.
# .deepspeed_env: lines `NAME=value` in the current directory or ~ are exported on every
#   node (e.g. NCCL_SOCKET_IFNAME=eth0, DS_ACCELERATOR=cpu, PATH=... of the venv).
# Without passwordless ssh: the deepspeed launcher reaches other nodes with pdsh/ssh.
#   Either use MPI (--launcher mpich|openmpi, or launch/mpi.sh), Slurm (launch/slurm/), or
#   start it on every node yourself with `--no_ssh --node_rank R --master_addr HOST0`.
#   On one node with a hostfile, `--force_multi --no_ssh_check --master_addr 127.0.0.1
#   --launcher mpich` exercises the multi-node path without ssh (how the tests run it).
#
# Every rank runs `python -m mom_ds.launch_utils run --from env -- mom-train ARGS`: the
# deepspeed launcher sets RANK & co.; the wrapper waits a bounded time for the master
# (MOM_MASTER_TIMEOUT, default 120 s) instead of hanging on an unreachable one.
#
# Signals: SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) to this script go to the ranks on this node,
# not to the launcher (`launch_utils supervise`): the ranks finish their step, save and
# exit 5 (README, "Preemption"). The deepspeed launcher itself would die on SIGTERM leaving
# the ranks training, or SIGKILL them 30 s after forwarding it, mid-save.
set -euo pipefail

ds_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do ds_args+=("$1"); shift; done
[ $# -gt 1 ] || { echo "deepspeed.sh: usage: launch/deepspeed.sh [DEEPSPEED_ARGS...] -- MOM_TRAIN_ARGS..." >&2; exit 2; }
shift

PYTHON=${MOM_PYTHON:-python}
for i in "${!ds_args[@]}"; do
    case "${ds_args[$i]}" in
        --hostfile) "$PYTHON" -m mom_ds.launch_utils check-hostfile "${ds_args[$((i + 1))]:-}" ;;
        --hostfile=*) "$PYTHON" -m mom_ds.launch_utils check-hostfile "${ds_args[$i]#--hostfile=}" ;;
    esac
done

# launch/rank.py = python -m mom_ds.launch_utils (a script path: see its docstring).
exec "$PYTHON" -m mom_ds.launch_utils supervise -- \
    deepspeed ${ds_args[@]+"${ds_args[@]}"} --no_local_rank "$(cd "$(dirname "$0")" && pwd)/rank.py" \
    run --from env -- mom-train "$@"
