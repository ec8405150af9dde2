"""launch/slurm on a real slurmctld + slurmd on this host: a 2-task job trains, a requeued
job stopped by USR1 saves, requeues itself and resumes from its checkpoint, a too-small
allocation fails fast and clearly."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from mom_ds_testing.launchers import REPO, local_slurm, prepare_data, run, tiny_args

pytestmark = pytest.mark.slow
SUBMIT = str(REPO / "launch" / "slurm" / "submit.sh")


@pytest.fixture(scope="module")
def slurm():
    with local_slurm() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_data(tmp_path_factory.mktemp("data") / "builtin")


def submit(slurm, logs: Path, *args: str) -> str:
    result = slurm.cmd(SUBMIT, "--logs", str(logs), *args)
    assert result.returncode == 0, result.stderr
    return re.search(r"Submitted batch job (\d+)", result.stdout).group(1)


def job_log(logs: Path, job: str) -> str:
    """The job's output so far ("" before it starts)."""
    found = list(logs.glob(f"*-{job}.out"))
    return found[0].read_text() if found else ""


def test_two_tasks_train_and_report(slurm, data, tmp_path):
    out = tmp_path / "run"
    job = submit(slurm, tmp_path, "--tasks-per-node", "2", "--job-name", "tiny", "--",
                 *tiny_args(data, out, steps=4))
    state = slurm.wait_job(job, timeout=150)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", log[-3000:]
    assert slurm.job_field(job, "ExitCode") == "0:0"
    assert "training 4 steps" in log and "on 2 rank(s)" in log, log[-3000:]
    assert (out / "ckpt" / "latest").read_text() == "step_000004"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]

    png = tmp_path / "report.png"
    report = run(["mom-report", str(out), "--out", str(png)], timeout=120)
    assert report.returncode == 0, report.stderr
    assert png.stat().st_size > 10_000


def test_usr1_stops_saves_and_requeues(slurm, data, tmp_path):
    """A requeued job resumes: what --signal=B:USR1@120 does before the time limit, sent by
    hand. The script forwards USR1 to the ranks, they save and exit 5, the script requeues
    the job, and the restart (--resume auto) continues from that checkpoint to the end,
    every step logged once. (A requeue by the scheduler: test_launch_two_nodes.py.)"""
    out = tmp_path / "run"
    job = submit(slurm, tmp_path, "--tasks-per-node", "2", "--",
                 *tiny_args(data, out, steps=20, ckpt_interval=1000))
    deadline = time.monotonic() + 150
    while not re.search(r"^step [3-9]/20 ", job_log(tmp_path, job), re.M):
        assert time.monotonic() < deadline and slurm.state(job) in (
            "PENDING", "RUNNING", "CONFIGURING"), job_log(tmp_path, job)[-3000:]
        time.sleep(0.3)
    signal = slurm.cmd("scancel", "--signal=USR1", "--batch", job)
    assert signal.returncode == 0, signal.stderr
    slurm.release_requeued(job, marker=str(out), timeout=120)
    state = slurm.wait_job(job, timeout=200)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", f"{log[-3000:]}\n{slurm.diagnose(job)}"
    assert slurm.job_field(job, "Restarts") == "1"
    stopped = re.search(r"^mom-train: stopped: SIGUSR1 after step (\d+): saved checkpoint ",
                        log, re.M)
    assert stopped, log[-3000:]
    assert f"requeueing job {job}" in log and "Traceback" not in log, log[-3000:]
    assert f"resumed from step {stopped[1]} " in log, log[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 21))


def test_allocation_smaller_than_config_needs(slurm, data, tmp_path):
    # A DeepSpeed JSON whose train_batch_size (micro 2 x accum 1 x 2 ranks) pins 2 ranks,
    # submitted with one task.
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": 4, "zero_optimization": {"stage": 1}}))
    start = time.monotonic()
    job = submit(slurm, tmp_path, "--tasks-per-node", "1", "--",
                 *tiny_args(data, tmp_path / "run"), "--deepspeed", str(ds_json))
    state = slurm.wait_job(job, timeout=60)
    log = job_log(tmp_path, job)
    assert state == "FAILED", log
    assert "this Slurm job has 1 task(s)" in log and "needs 2 ranks" in log, log
    assert "Fix:" in log
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run").exists()  # nothing was started


def test_request_larger_than_cluster_is_refused(slurm, data, tmp_path):
    result = slurm.cmd(SUBMIT, "--logs", str(tmp_path), "--nodes", "4", "--",
                       *tiny_args(data, tmp_path / "run"))
    assert result.returncode == 1
    assert "Slurm cannot run 4 node(s) x 1 task(s) here: Requested node configuration is " \
        "not available" in result.stderr, result.stderr
    assert "Fix:" in result.stderr
    assert slurm.cmd("squeue", "-h").stdout.strip() == ""  # nothing left pending


def test_hostfile_from_allocation(slurm, tmp_path):
    hostfile = tmp_path / "hostfile"
    result = slurm.cmd("sbatch", "--parsable", "--ntasks", "2", "--output",
                       str(tmp_path / "%j.out"), "--wrap",
                       f"python -m mom_ds.launch_utils slurm-hostfile --slots 2 --out {hostfile}"
                       f" && python -m mom_ds.launch_utils check-hostfile {hostfile} --need 2")
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    assert slurm.wait_job(job, timeout=60) == "COMPLETED", (tmp_path / f"{job}.out").read_text()
    host = slurm.cmd("hostname", "-s").stdout.strip()
    assert hostfile.read_text() == f"{host} slots=2\n"
    assert "1 host(s), 2 slot(s)" in (tmp_path / f"{job}.out").read_text()
