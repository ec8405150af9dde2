#!/bin/bash
# Installs what the launcher tests use: Slurm + munge, sshd + pdsh (apt, needs root) and
# MPICH, mpi4py and matplotlib (pip, into the venv; matplotlib draws mom-report and the
# benchmarks' figures). bench/repro.py's corpus packages are not needed by any test (they
# use trees made by the test). Idempotent and quiet; a part that cannot be installed is
# reported and its tests skip, so this script itself never fails CI.
#   launch/ci_setup.sh [VENV]      (default .venv)
set -uo pipefail
venv=${1:-.venv}
export DEBIAN_FRONTEND=noninteractive

# apt_install WHAT_SKIPS PACKAGE...: one apt-get install per group, so a package this
# distribution lacks does not take the others down with it.
apt_install() {
    local skips=$1
    shift
    if [ "$(id -u)" != 0 ]; then
        echo "ci_setup: not root, skipping $* ($skips)"
        return
    fi
    install() { timeout 600 apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
    # The package lists may be missing or stale on a fresh image: update once and retry.
    if install "$@" || { timeout 300 apt-get update -qq >/dev/null && install "$@"; }; then
        echo "ci_setup: installed $*"
    else
        echo "ci_setup: apt-get install $* failed ($skips)"
    fi
}

# slurm-wlm + munge: Slurm; openssh-server + pdsh + iproute2: the two-host tests (network
# namespaces with an sshd each, reached by the deepspeed launcher's pdsh and MPICH's ssh).
packages=(slurm-wlm munge openssh-server openssh-client pdsh iproute2)
if command -v slurmctld >/dev/null && command -v munged >/dev/null && [ -x /usr/sbin/sshd ] \
        && command -v pdsh >/dev/null && command -v ip >/dev/null; then
    echo "ci_setup: ${packages[*]} already installed"
else
    apt_install "Slurm and two-host tests will skip" "${packages[@]}"
fi

# The mpich wheel has no Python module; its mpirun lands in the venv's bin.
if [ -x "$venv/bin/mpirun" ] && "$venv/bin/python" -c "import mpi4py, matplotlib" 2>/dev/null; then
    echo "ci_setup: mpich, mpi4py and matplotlib already installed"
elif timeout 600 "$venv/bin/pip" install -q mpich mpi4py matplotlib; then
    echo "ci_setup: installed mpich, mpi4py and matplotlib"
else
    echo "ci_setup: pip install mpich mpi4py matplotlib failed (MPI and report tests will skip)"
fi
exit 0
