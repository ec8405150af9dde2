"""Shared pieces of the launcher tests: a real Slurm on localhost, the tiny training
arguments, and a skip where Slurm cannot be had. Every subprocess has a hard timeout."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from .multirank import free_port  # noqa: F401 (the launcher tests take it from here)

REPO = Path(__file__).resolve().parents[2]  # installed editable: the checkout
BIN = Path(sys.executable).parent
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env(**extra: str) -> dict[str, str]:
    """The test environment with the venv first on PATH (srun and mpirun children find
    python, mom-train and mpirun there) and CPU DeepSpeed."""
    # a launcher sets the rank variables itself: none inherited from the test process
    out = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    out.update(PATH=f"{BIN}:{os.environ.get('PATH', '')}", DS_ACCELERATOR="cpu",
               PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with a hard timeout and text output; the test sees the output when
    the command fails."""
    kwargs.setdefault("env", env())
    kwargs.setdefault("cwd", REPO)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def prepare_data(out: Path) -> Path:
    """The builtin byte-level corpus from mom-prep (about a second)."""
    result = run(["mom-prep", "--source", "builtin", "--tokenizer", "bytes", "--out", str(out)],
                 timeout=120)
    assert result.returncode == 0, f"mom-prep failed: {result.stderr[-500:]}"
    return out


def tiny_args(data: Path, out_dir: Path, steps: int = 4, ckpt_interval: int = 2) -> list[str]:
    """mom-train arguments for a few steps of configs/tiny.yaml that log every step."""
    return ["--config", "configs/tiny.yaml", "--data.data_dir", str(data),
            "--train.out_dir", str(out_dir), "--train.max_steps", str(steps),
            "--train.micro_batch_size", "2", "--train.warmup_steps", "1",
            "--train.log_interval", "1", "--train.eval_interval", "0",
            "--train.eval_batches", "1", "--train.ckpt_interval", str(ckpt_interval)]



# ---------------------------------------------------------------------------- Slurm
SLURM_CONF = """\
ClusterName=momtest
SlurmctldHost={ctld_host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={run}/munge/munge.socket
StateSaveLocation={run}/state
SlurmdSpoolDir={run}/spool-%n
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd-%n.pid
SlurmctldLogFile={run}/slurmctld.log
SlurmdLogFile={run}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
{node_lines}
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name}{addr} CPUs={cpus} RealMemory=2000 State=UNKNOWN"


class Slurm:
    """A running slurmctld + slurmd(s) (+ munged), driven through SLURM_CONF: on this host,
    or on the namespace hosts of two_hosts.py (one slurmd each; the controller and every
    client command on the first)."""

    def __init__(self, run_dir: Path, hosts=None):
        self.run_dir = run_dir
        self.conf = run_dir / "slurm.conf"
        self.hosts = hosts
        self.env = (hosts.env if hosts else env)(SLURM_CONF=str(self.conf))

    def cmd(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        cmd = self.hosts.hosts[0].enter(args) if self.hosts else list(args)
        return run(cmd, timeout=timeout, env=self.env)

    def wait_job(self, job_id: str, timeout: float) -> str:
        """Poll until the job has left the queue; return its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED",
                             "REQUEUE_HOLD", "REQUEUE_FED", ""):
                return state
            time.sleep(1)
        self.cmd("scancel", job_id)
        raise AssertionError(f"job {job_id} still {self.state(job_id)} after {timeout} s; "
                             f"slurmctld log: {self.log_tail()}")

    def state(self, job_id: str) -> str:
        out = self.cmd("scontrol", "show", "job", job_id).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return ""

    def job_field(self, job_id: str, name: str) -> str:
        for field in self.cmd("scontrol", "show", "job", job_id).stdout.split():
            if field.startswith(name + "="):
                return field.split("=", 1)[1]
        return ""

    def log_tail(self) -> str:
        logs = [self.run_dir / "slurmctld.log", *sorted(self.run_dir.glob("slurmd-*.log"))]
        return "\n".join(p.read_text()[-1500:] for p in logs if p.is_file())

    def diagnose(self, job_id: str) -> str:
        """What a failed assertion about a job should show: the job record and the
        daemons' last log lines."""
        show = self.cmd("scontrol", "show", "job", job_id)
        return f"scontrol show job {job_id}:\n{show.stdout}{show.stderr}\n{self.log_tail()}"

    def requeue(self, job_id: str, marker: str, timeout: float = 60) -> None:
        """`scontrol requeue` a running job, wait until the old run is completely gone and
        let the job start again at once (instead of Slurm's two-minute BeginTime hold).

        The hold exists partly for a race this skips: slurmd revokes the job's credentials
        at the kill time, in whole seconds, and refuses a batch launch whose credential was
        created in that same second ("Job N already killed, do not launch batch job");
        slurmctld then ends the job FAILED ("Killing non-startable batch JobId=N: Job
        credential revoked") and it never restarts. So the release waits for
        (1) the state PENDING: no longer COMPLETING, slurmd saw every step end,
        (2) no process left whose command line contains `marker` (the old ranks), and
        (3) the next second after the requeue, so the new credential is strictly newer."""
        result = self.cmd("scontrol", "requeue", job_id)
        assert result.returncode == 0, result.stderr
        self.release_requeued(job_id, marker, timeout)

    def release_requeued(self, job_id: str, marker: str, timeout: float = 60) -> None:
        """The waits of requeue() for a job requeued by anyone (its own script included):
        it is PENDING, its old processes are gone, a new second has begun: start it now."""
        deadline = time.monotonic() + timeout
        while (state := self.state(job_id)) != "PENDING":
            assert time.monotonic() < deadline, \
                f"requeued job {job_id} still {state} after {timeout} s\n{self.diagnose(job_id)}"
            time.sleep(0.3)
        killed_at = time.time()  # the kill was stamped before the job showed PENDING
        while left := processes_with(marker):
            assert time.monotonic() < deadline, \
                f"processes of the requeued run still alive after {timeout} s: {left}"
            time.sleep(0.3)
        time.sleep(max(0.0, math.floor(killed_at) + 1.2 - time.time()))
        update = self.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        assert update.returncode == 0, update.stderr


def processes_with(marker: str) -> list[str]:
    """Command lines of the live processes whose arguments contain `marker`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        text = " ".join(a.decode(errors="replace") for a in args if a)
        if marker in text:
            found.append(f"{cmdline.parent.name}: {text[:200]}")
    return found


def slurm_missing() -> str | None:
    """Why a local Slurm cannot run here, or None."""
    if os.geteuid() != 0:
        return "starting slurmd/munged needs root"
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"):
        if shutil.which(tool, path=f"/usr/sbin:/usr/bin:{os.environ.get('PATH', '')}") is None:
            return f"{tool} not found (launch/ci_setup.sh installs slurm-wlm and munge)"
    if not Path("/etc/munge/munge.key").is_file():
        return "/etc/munge/munge.key is missing (apt-get install munge creates it)"
    return None


def _spawn(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    # Own session: stopping the daemon later never touches the test's process group.
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True, **kwargs)


@contextlib.contextmanager
def local_slurm(hosts=None) -> Iterator[Slurm]:
    """munged, slurmctld and slurmd started by hand (no systemd here), stopped by pid: one
    node, this host, or with `hosts` (a two_hosts.TwoHosts) one node per namespace host,
    each slurmd inside its host (`slurmd -N NAME`). munged serves all of them through its
    socket, a file both hosts see. The directory is a fresh one under /tmp that the munge
    user can reach (pytest's tmp_path lies under a root-only directory)."""
    why = slurm_missing()
    if why:
        pytest.skip(f"no local Slurm: {why}")
    run_dir = Path(tempfile.mkdtemp(prefix="mom-slurm-"))
    run_dir.chmod(0o755)
    for sub in ("state", "munge"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir / "munge", "munge", "munge")
    os.chmod(run_dir / "munge", 0o755)  # munged insists that everyone can reach its socket
    slurm = Slurm(run_dir, hosts)
    if hosts:
        nodes = [(h.name, f" NodeAddr={h.addr}") for h in hosts.hosts]
        ctld_host = f"{nodes[0][0]}({hosts.hosts[0].addr})"
    else:
        nodes = [(socket.gethostname().split(".")[0], "")]
        ctld_host = nodes[0][0]
    slurm.conf.write_text(SLURM_CONF.format(
        ctld_host=ctld_host, run=run_dir, ctld_port=free_port(), d_port=free_port(),
        nodes=",".join(name for name, _ in nodes),
        node_lines="\n".join(NODE_LINE.format(name=name, addr=addr, cpus=os.cpu_count())
                             for name, addr in nodes)))

    def start(daemon: str, node: int, *args: str) -> subprocess.Popen:
        cmd = [f"/usr/sbin/{daemon}", "-D", "-f", str(slurm.conf), *args]
        log = run_dir / f"{daemon}-{nodes[node][0]}.out"
        if hosts:
            return hosts.spawn(node, cmd, log, SLURM_CONF=str(slurm.conf))
        return _spawn(cmd, log, env=slurm.env)
    # Our own munged socket (AuthInfo above): a system munged, if one runs, is left alone.
    socket_path = run_dir / "munge" / "munge.socket"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_spawn(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground",
                             f"--socket={socket_path}", f"--log-file={run_dir}/munge/munged.log",
                             f"--pid-file={run_dir}/munge/munged.pid",
                             f"--seed-file={run_dir}/munge/munged.seed"],
                            run_dir / "munged.out"))
        _wait_for(lambda: socket_path.exists(), 10, "munged socket", run_dir / "munged.out")
        procs.append(start("slurmctld", 0))
        procs += [start("slurmd", i, "-N", name) for i, (name, _) in enumerate(nodes)]
        _wait_for(lambda: slurm.cmd("sinfo", "-h", "-N", "-o", "%T").stdout.split().count("idle")
                  == len(nodes), 30, f"{len(nodes)} idle Slurm node(s)", run_dir / "slurmctld.log")
        yield slurm
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if os.environ.get("MOM_KEEP_SLURM_DIR") != "1":  # keep the logs to debug a failure
            shutil.rmtree(run_dir, ignore_errors=True)


def _wait_for(ready, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    text = log.read_text()[-2000:] if log.is_file() else "(no log)"
    raise AssertionError(f"{what} not up after {timeout} s; {log}:\n{text}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the daemon's session, SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
