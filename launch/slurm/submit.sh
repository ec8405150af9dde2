#!/bin/bash
# Submit launch/slurm/train.sbatch with the shape of the run spelled out.
#
#   launch/slurm/submit.sh [--nodes N] [--gpus-per-node G | --tasks-per-node T]
#       [--time HH:MM:SS] [--job-name NAME] [--partition P] [--logs DIR] [--dry-run]
#       -- MOM_TRAIN_ARGS...
#
# One task per GPU: --gpus-per-node G also sets G tasks per node. Without GPUs give
# --tasks-per-node. The job log goes to DIR/NAME-JOBID.out (DIR default runs/slurm; it is
# created here because Slurm does not create it and the job would fail without a word).
# --dry-run prints the sbatch command and the commands the job will run, and submits nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

nodes=1 gpus=0 tasks=0 time=01:00:00 name=mom-train partition="" logs=runs/slurm dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes=$2; shift 2 ;;
        --gpus-per-node) gpus=$2; shift 2 ;;
        --tasks-per-node) tasks=$2; shift 2 ;;
        --time) time=$2; shift 2 ;;
        --job-name) name=$2; shift 2 ;;
        --partition) partition=$2; shift 2 ;;
        --logs) logs=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --) shift; break ;;
        *) echo "submit.sh: unknown option $1 (mom-train arguments go after --)" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "submit.sh: no mom-train arguments. Fix: ... -- --config configs/tiny.yaml" >&2; exit 2; }
if [ "$tasks" = 0 ]; then tasks=$(( gpus > 0 ? gpus : 1 )); fi
if [ "$gpus" -gt 0 ] && [ "$gpus" != "$tasks" ]; then
    echo "submit.sh: --gpus-per-node $gpus with --tasks-per-node $tasks; mom-train runs one task per GPU. Fix: drop --tasks-per-node." >&2
    exit 2
fi

cmd=(sbatch --job-name "$name" --nodes "$nodes" --ntasks-per-node "$tasks" --time "$time"
     --output "$logs/%x-%j.out" --export "ALL,MOM_WORLD_SIZE=$((nodes * tasks))")
[ "$gpus" -gt 0 ] && cmd+=(--gpus-per-node "$gpus")
[ -n "$partition" ] && cmd+=(--partition "$partition")
cmd+=("$here/train.sbatch" "$@")

if [ "$dry" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    echo "# the job then runs:"
    MOM_DRY_RUN=1 MOM_WORLD_SIZE=$((nodes * tasks)) bash "$here/train.sbatch" "$@"
    exit 0
fi
# A request the cluster can never satisfy is otherwise accepted and pends forever
# (Reason=PartitionNodeLimit); --test-only asks the scheduler first.
if ! check=$(sbatch --test-only "${cmd[@]:1}" 2>&1); then
    echo "submit.sh: Slurm cannot run $nodes node(s) x $tasks task(s) here: ${check##*: }" >&2
    echo "submit.sh: Fix: ask for what \`sinfo -N -o '%N %c %G'\` lists (nodes, CPUs, GPUs per node)." >&2
    exit 1
fi
mkdir -p "$logs"
"${cmd[@]}"
