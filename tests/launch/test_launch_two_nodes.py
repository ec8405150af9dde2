"""The launchers across two real hosts (network namespaces on this machine, two_hosts.py):
the deepspeed launcher over pdsh/ssh with a two-host hostfile, MPICH's mpirun over ssh,
Slurm with a slurmd per host; shared and node-local directories; a rank killed on the
second host or its link taken down, and the resume that follows."""
from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from mom_ds_testing.launchers import REPO, local_slurm, prepare_data, processes_with, run, tiny_args
from test_launch_mpi import require_mpi
from mom_ds_testing.runs import metrics
from mom_ds_testing.two_hosts import TwoHosts, two_hosts

pytestmark = pytest.mark.slow
TABLE = "2 rank(s) on 2 host(s): rank 0 on mom-a; rank 1 on mom-b"
# Global batch 4 windows: 2 ranks x 2, or 1 rank x 4 (test_train_multirank.py's reasoning).
RTOL = 1e-4
ENV_MARK = "MOM_TWO_NODE_CHECK"


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def shared(hosts) -> Path:
    """A directory both hosts see (the harness's own, under /tmp) with the data in it."""
    root = hosts.root / "shared"
    prepare_data(root / "data")
    return root


def ds_command(shared: Path, train_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """launch/deepspeed.sh with a hostfile of both hosts (1 slot each), and its environment:
    the deepspeed launcher reaches the hosts with pdsh over ssh, finds the master address
    itself (`ssh mom-a hostname -I`) and exports the lines of .deepspeed_env on every host."""
    hostfile = shared / "hostfile"
    hostfile.write_text("mom-a slots=1\nmom-b slots=1\n")
    ds_env = shared / "deepspeed_env"
    ds_env.write_text(f"DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\n{ENV_MARK}=crossed\n")
    return (["launch/deepspeed.sh", "--hostfile", str(hostfile), "--", *train_args],
            {"DS_ENV_FILE": str(ds_env)})


def ds_launch(hosts: TwoHosts, shared: Path, train_args: list[str], timeout: float = 240):
    """The deepspeed launcher started on mom-a, to its end."""
    cmd, extra_env = ds_command(shared, train_args)
    return hosts.run(0, cmd, timeout=timeout, **extra_env)


def ep2_args(data: Path, out: Path, steps: int = 3, ckpt_interval: int = 0) -> list[str]:
    return [*tiny_args(data, out, steps=steps, ckpt_interval=ckpt_interval),
            "--parallel.expert_parallel_size", "2", "--train.eval_interval", str(steps)]


def losses(out: Path) -> dict[int, float]:
    return {step: row["train/loss"] for step, row in metrics(out).items() if "train/loss" in row}


@pytest.fixture(scope="module")
def one_process(shared) -> Path:
    """The reference: one process on the whole global batch (4 windows a step)."""
    out = shared / "one-process"
    result = run(["mom-train", *ep2_args(shared / "data", out), "--train.micro_batch_size", "4",
                  "--parallel.expert_parallel_size", "1"], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_follows(out: Path, reference: Path) -> None:
    got, want = metrics(out), metrics(reference)
    assert sorted(losses(out)) == sorted(losses(reference)) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=RTOL), step
    assert got[3]["eval/loss"] == pytest.approx(want[3]["eval/loss"], rel=RTOL)


def test_deepspeed_launcher_over_ssh_equals_one_process(hosts, shared, one_process):
    out = shared / "ds-pdsh"
    result = ds_launch(hosts, shared, ep2_args(shared / "data", out))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Using IP address of 10.231.7.1 for node mom-a" in log  # not 127.0.0.1
    assert "pdsh -S" in log and f"export {ENV_MARK}=crossed" in log
    assert f"mom-a: {TABLE}" in log, log[-4000:]  # rank 1 really ran on the other host
    assert_follows(out, one_process)


def test_mpirun_across_two_hosts(hosts, shared, one_process):
    require_mpi()
    out = shared / "mpi"
    result = hosts.run(0, ["launch/mpi.sh", "-np", "2", "-hosts", "mom-a,mom-b", "--",
                           *ep2_args(shared / "data", out)], timeout=240)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert TABLE in log, log[-4000:]
    assert_follows(out, one_process)


def test_slurm_two_nodes_train_and_a_requeue_resumes(hosts, shared):
    with local_slurm(hosts) as slurm:
        out, logs = shared / "slurm", shared / "slurm-logs"
        submitted = slurm.cmd(str(REPO / "launch" / "slurm" / "submit.sh"), "--logs", str(logs),
                              "--nodes", "2", "--tasks-per-node", "1", "--",
                              *tiny_args(shared / "data", out, steps=8, ckpt_interval=2),
                              "--parallel.expert_parallel_size", "2")
        assert submitted.returncode == 0, submitted.stderr
        job = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
        deadline = time.monotonic() + 150
        while not (out / "ckpt" / "latest").is_file():  # the first checkpoint, then a requeue
            assert time.monotonic() < deadline, slurm.diagnose(job)
            assert slurm.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), slurm.diagnose(job)
            time.sleep(0.5)
        slurm.requeue(job, marker=str(out))
        state = slurm.wait_job(job, timeout=200)
        log = next(logs.glob(f"*-{job}.out")).read_text()
        assert state == "COMPLETED", f"{log[-3000:]}\n{slurm.diagnose(job)}"
        assert slurm.job_field(job, "ExitCode") == "0:0"
        assert "2 task(s) on mom-a,mom-b" in log and TABLE in log, log[-3000:]
        assert "(restart 1)" in log and "resumed from step" in log, log[-3000:]
        assert (out / "ckpt" / "latest").read_text() == "step_000008"


def test_node_local_out_dir_is_refused_at_start(hosts, shared):
    """train.out_dir on NODE_LOCAL: each host has its own directory at that path."""
    out = hosts.node_local / "run"
    start = time.monotonic()
    result = ds_launch(hosts, shared, ep2_args(shared / "data", out), timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    message = (f"mom-train: error: train.out_dir = '{out}' is not one directory for all ranks: "
               f"rank 1 on mom-b cannot see the file rank 0 on mom-a wrote there.")
    assert log.count(message) == 1, log[-4000:]
    assert "Fix: put train.out_dir on a file system every node mounts" in log
    assert "Traceback" not in log and time.monotonic() - start < 90
    assert not (hosts.local_dir(0) / "run" / "ckpt").exists()  # refused before training


def test_node_local_data_copies_train_and_a_missing_copy_is_named(hosts, shared, one_process):
    """Data read from NODE_LOCAL: a copy on each host trains like shared data; without the
    copy on mom-b the run stops at once, the message naming rank 1 and its host (without
    the agreement, rank 1 would exit unheard and rank 0 wait at the rendezvous)."""
    local_data = hosts.node_local / "data"
    for host in (0, 1):
        shutil.copytree(shared / "data", hosts.local_dir(host) / "data", dirs_exist_ok=True)
    out = shared / "local-data"
    result = ds_launch(hosts, shared, ep2_args(local_data, out))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert_follows(out, one_process)

    shutil.rmtree(hosts.local_dir(1) / "data")
    start = time.monotonic()
    result = ds_launch(hosts, shared, ep2_args(local_data, shared / "missing-copy"), timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert log.count(f"mom-train: error: on rank 1 on mom-b: data.data_dir = '{local_data}' "
                     f"does not exist.") == 1, log[-4000:]
    assert "Traceback" not in log and time.monotonic() - start < 90


def training_process(hosts: TwoHosts, index: int, marker: str) -> int:
    """The pid of the mom-train rank on a host (not its launcher), found by its out_dir."""
    for pid in hosts.hosts[index].processes():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in cmdline]
        launcher = "deepspeed.launcher.launch" in text  # its command line names rank.py too
        if marker in text and any(a.endswith("rank.py") for a in text) and not launcher:
            return pid
    raise AssertionError(f"no training process for {marker} on {hosts.hosts[index].name}")


# How the second host is lost mid-run: its rank killed (the kernel closes its sockets, the
# survivor's collective fails at once), or its link taken down (nothing arrives any more: the
# survivor's collective fails at parallel.timeout_minutes).
FAULTS = {"killed": ("1", 0, 40), "link_down": ("0.5", 25, 75)}  # timeout, seconds min/max


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_lost_second_host_is_named_and_the_run_resumes(hosts, shared, fault):
    timeout_minutes, at_least, at_most = FAULTS[fault]
    out = shared / fault
    args = [*ep2_args(shared / "data", out, steps=400, ckpt_interval=2),
            "--train.eval_interval", "0", "--parallel.timeout_minutes", timeout_minutes]
    proc_log = shared / f"{fault}.log"
    cmd, extra_env = ds_command(shared, args)
    launcher = hosts.spawn(0, cmd, proc_log, **extra_env)
    deadline = time.monotonic() + 150
    while not (out / "ckpt" / "latest").is_file():
        assert launcher.poll() is None and time.monotonic() < deadline, proc_log.read_text()[-4000:]
        time.sleep(0.3)
    victim = training_process(hosts, 1, str(out))
    # the hostfile's .deepspeed_env reached the other host's rank
    environ = Path(f"/proc/{victim}/environ").read_bytes().split(b"\0")
    assert f"{ENV_MARK}=crossed".encode() in environ and b"RANK=1" in environ
    if fault == "killed":
        os.kill(victim, signal.SIGKILL)
    else:
        hosts.link(1, up=False)
    lost_at = time.monotonic()
    try:
        launcher.wait(timeout=120)
    finally:
        hosts.link(1, up=True)
    log = proc_log.read_text()
    took = time.monotonic() - lost_at
    # the check-in adds peers.CHECK_IN_WAIT_S (15 s) to the failed collective
    assert at_least <= took < at_most, f"{took:.0f} s\n{log[-4000:]}"
    assert launcher.returncode != 0
    lost = re.search(r"mom-a: mom-train: error: lost rank 1 on mom-b during step (\d+) \(.*\)\. "
                     r"the last complete checkpoint is (step_\d+): once every host is back, "
                     r"restart the same launch with --resume\.", log)
    assert lost, log[-4000:]
    tag = lost.group(2)
    assert (out / "ckpt" / "latest").read_text() == tag
    while processes_with(str(out)):  # mom-b's rank ends on its own timeout
        assert time.monotonic() - lost_at < 150, processes_with(str(out))
        time.sleep(0.5)

    resumed_at = int(tag.split("_")[1])
    result = ds_launch(hosts, shared, [*args, "--resume", "--stop-after", str(resumed_at + 2)])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"resumed from step {resumed_at} " in log, log[-4000:]
    assert (out / "ckpt" / "latest").read_text() == f"step_{resumed_at + 2:06d}"
