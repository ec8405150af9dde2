"""launch/mpi.sh under a real MPICH (pip install mpich mpi4py), and the deepspeed launcher
with a hostfile, both with 2 ranks of the tiny config on this host."""
from __future__ import annotations

import shutil

import pytest

from mom_ds_testing.launchers import env, free_port, prepare_data, run, tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("data") / "builtin")


def require_mpi() -> None:
    pytest.importorskip("mpi4py", reason="mpi4py missing (launch/ci_setup.sh installs it)")
    if shutil.which("mpirun", path=env()["PATH"]) is None:
        pytest.skip("mpirun missing (launch/ci_setup.sh: pip install mpich)")


def assert_trained(result, out, steps: int) -> None:
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"step {steps}/{steps}" in log and "on 2 rank(s)" in log, log[-4000:]
    assert (out / "ckpt" / "latest").read_text() == f"step_{steps:06d}"


def test_mpirun_two_ranks(data, tmp_path):
    require_mpi()
    out = tmp_path / "run"
    result = run(["launch/mpi.sh", "-np", "2", "--", *tiny_args(data, out, steps=2)],
                 timeout=180, env=env(MASTER_PORT=str(free_port())))
    assert_trained(result, out, 2)
    # every rank found its place through mpi4py: rank 1 wrote its own checkpoint state
    assert (out / "ckpt" / "step_000002" / "run_state_rank1.pt").is_file()


def test_deepspeed_launcher_with_hostfile(data, tmp_path):
    """The multi-node path of the deepspeed launcher on one host: a hostfile and
    --force_multi (else a one-host hostfile silently runs locally), no ssh check, the
    MPICH runner instead of pdsh."""
    require_mpi()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    result = run(["launch/deepspeed.sh", "--hostfile", str(hostfile), "--force_multi",
                  "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port",
                  str(free_port()), "--launcher", "mpich", "--",
                  *tiny_args(data, out, steps=2)], timeout=240)
    assert "1 host(s), 2 slot(s)" in result.stdout
    assert_trained(result, out, 2)
