"""What the launch scripts in `launch/` need from Python: strict hostfiles, the rank
environment of each launcher, an allocation check, and a bounded wait for the master.

Every launcher ends in the same per-rank command,

    python -m mom_ds.launch_utils run --from {env,slurm,mpi} -- mom-train ARGS...

which turns the launcher's own variables into RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, waits (for a bounded time) until the master accepts TCP
connections, and then runs the console script in this process. So the trainer never knows
which launcher started it, and an unreachable master is an error after
MOM_MASTER_TIMEOUT seconds instead of torch's silent ten-minute rendezvous wait.

Subcommands (each exits 1 with a message that names the fix):
  check-hostfile FILE [--need N]    validate a DeepSpeed/MPI hostfile (`host slots=N` lines)
  slurm-hostfile --slots N [--out F] write a hostfile for this Slurm allocation
  check-allocation [--need N] -- TRAIN_ARGS
                                    this Slurm job has at least the ranks the run needs
  run --from SOURCE -- CMD ARGS...  per-rank entry point described above
  supervise -- LAUNCHER ARGS...     run a launcher (deepspeed, mpirun) and forward SIGTERM,
                                    SIGUSR1 and SIGINT to its ranks only (see supervise())
TRAIN_ARGS are mom-train's own (--config C [--deepspeed D] [--section.key value ...]).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Mapping, Optional, Sequence

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_PORT = 29500
MASTER_TIMEOUT_S = float(os.environ.get("MOM_MASTER_TIMEOUT", "120"))
SUBPROCESS_TIMEOUT_S = 30  # scontrol answers in milliseconds; never wait forever on it


class LaunchError(RuntimeError):
    """A launch that cannot work; the message says what to change."""


# ---------------------------------------------------------------------------- hostfiles
# DeepSpeed's parser (launcher/runner.py) searches `^(\S+)\s+slots=(\d+)`, so
# `node1 slots=4x` or `node1 slots=4 # gpus 0-3 broken` pass, and a hostfile path that does
# not exist silently runs on the local node only (DeepSpeed #5221). Ours matches whole lines.
HOST_LINE = re.compile(r"(?P<host>[^\s#=]+)\s+slots=(?P<slots>\d+)")


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """`host slots=N` lines (blank lines and `#` comments allowed) -> {host: slots}, in
    file order. Any other line, slots < 1, a repeated host or no host at all is an error."""
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOST_LINE.fullmatch(line)
        if match is None:
            raise LaunchError(f"{source} line {number}: {raw.strip()!r} is not 'HOST slots=N'. "
                              f"Fix: write e.g. 'node1 slots=8' (one host per line, slots "
                              f"= processes on that host, usually its GPU count).")
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise LaunchError(f"{source} line {number}: {host} has slots={slots}. Fix: give "
                              f"slots >= 1 or delete the line.")
        if host in hosts:
            raise LaunchError(f"{source} line {number}: host {host} is listed again (first on "
                              f"line {first_line[host]}). Fix: one line per host with the "
                              f"total slots.")
        hosts[host], first_line[host] = slots, number
    if not hosts:
        raise LaunchError(f"{source} lists no hosts. Fix: add lines like 'node1 slots=8'.")
    return hosts


def read_hostfile(path: str | Path) -> dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"hostfile {path} does not exist. (The deepspeed launcher would "
                          f"silently run on this node only.) Fix: pass the path of an existing "
                          f"file with 'host slots=N' lines.")
    return parse_hostfile(path.read_text(), source=str(path))


def format_hostfile(hosts: Mapping[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


# ---------------------------------------------------------------------------- Slurm
def slurm_nodes(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Host names of this job's allocation, in Slurm's order (first = master)."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is not set: this is not inside a Slurm job. "
                          "Fix: run it from an sbatch script or an salloc shell.")
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT_S)
    if result.returncode != 0 or not result.stdout.split():
        raise LaunchError(f"`scontrol show hostnames {nodelist}` failed: "
                          f"{result.stderr.strip()}")
    return result.stdout.split()


def slurm_port(environ: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else one derived from the job id, so two jobs that share a node
    do not both take the default port."""
    if "MASTER_PORT" in environ:
        return int(environ["MASTER_PORT"])
    return 20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000


def slurm_rank_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """RANK & co. of one `srun` task (one task per GPU)."""
    missing = [v for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID") if v not in environ]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not set: --from slurm must run as an srun "
                          f"task. Fix: `srun python -m mom_ds.launch_utils run --from slurm "
                          f"-- mom-train ...` inside the job.")
    master = environ.get("MASTER_ADDR") or slurm_nodes(environ)[0]
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ["SLURM_LOCALID"], "MASTER_ADDR": master, "MASTER_PORT": str(slurm_port(environ))}


def check_allocation(environ: Mapping[str, str], need: int, why: str) -> int:
    """The job's task count (and GPUs per node, where Slurm reports them) cover `need`
    ranks; returns the task count."""
    if "SLURM_NTASKS" not in environ:
        raise LaunchError("SLURM_NTASKS is not set: not inside a Slurm job. Fix: submit "
                          "with sbatch (launch/slurm/submit.sh).")
    tasks = int(environ["SLURM_NTASKS"])
    nodes = int(environ.get("SLURM_JOB_NUM_NODES", "1"))
    if tasks < need:
        raise LaunchError(f"this Slurm job has {tasks} task(s) on {nodes} node(s) but {why} "
                          f"needs {need} ranks. Fix: submit with --nodes/--ntasks-per-node "
                          f"giving {need} tasks (launch/slurm/submit.sh --nodes N "
                          f"--tasks-per-node T), or change the config.")
    gpus = environ.get("SLURM_GPUS_ON_NODE")
    per_node = -(-tasks // nodes)
    if gpus is not None and int(gpus) < per_node:
        raise LaunchError(f"Slurm gave {gpus} GPU(s) per node for {per_node} tasks per node "
                          f"(one task per GPU). Fix: --gpus-per-node {per_node}.")
    return tasks


def train_run_config(train_args: Sequence[str]):
    """The RunConfig mom-train would build from these arguments (its own parser)."""
    from .cli.train import load_config, parse_args

    args, overrides = parse_args(list(train_args))
    return load_config(args, overrides)


def world_size_pinned_by(run) -> Optional[int]:
    """Ranks the run's DeepSpeed JSON requires when it fixes train_batch_size (that is
    micro_batch_size x grad_accum_steps x world size); None when any world size fits."""
    from .config import load_deepspeed_json

    pinned = load_deepspeed_json(run.parallel.deepspeed).get("train_batch_size")
    if pinned is None:
        return None
    per_rank = run.train.micro_batch_size * run.train.grad_accum_steps
    if pinned % per_rank:
        raise LaunchError(f"{run.parallel.deepspeed}: train_batch_size {pinned} is not a "
                          f"multiple of micro_batch_size x grad_accum_steps = {per_rank}. "
                          f"Fix: drop train_batch_size from the JSON.")
    return pinned // per_rank


# ---------------------------------------------------------------------------- MPI
def mpi_rank_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Rank, size and master through mpi4py: DeepSpeed's own discovery (the one
    `deepspeed.init_distributed(auto_mpi_discovery=True)` runs), on MASTER_PORT or 29500."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise LaunchError("mpi4py is not installed. Fix: pip install 'mom-ds[mpi]' (or "
                          "`pip install mpich mpi4py` for a self-contained MPI).") from None
    from deepspeed.comm.comm import mpi_discovery

    mpi_discovery(distributed_port=int(environ.get("MASTER_PORT", DEFAULT_PORT)),
                  verbose=False)
    return {name: os.environ[name] for name in RANK_VARS}


# ---------------------------------------------------------------------------- master
def wait_for_master(addr: str, port: int, timeout_s: float, rank: int) -> None:
    """Return once addr:port accepts a TCP connection; LaunchError after timeout_s.

    A refused connection means the host answers but rank 0 has not opened its store yet
    (still importing torch), so we retry; no answer at all until the deadline means the
    address is wrong or firewalled."""
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise LaunchError(f"rank {rank}: MASTER_ADDR {addr!r} does not resolve ({err}). Fix: "
                          f"set it to the first node's host name or IP.") from None
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LaunchError(
                f"rank {rank}: the master {addr}:{port} did not accept a connection within "
                f"{timeout_s:g} s (last: {last}). Fix: MASTER_ADDR must be an address of "
                f"rank 0's node reachable from this node, the port open between nodes, and "
                f"rank 0 running; MOM_MASTER_TIMEOUT sets this wait.")
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, left)):
                return
        except OSError as err:
            last = os.strerror(err.errno) if err.errno else str(err) or "timed out"
            if err.errno == errno.ECONNREFUSED:
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


# ---------------------------------------------------------------------------- run
def rank_env(source: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    if source == "slurm":
        return slurm_rank_env(environ)
    if source == "mpi":
        return mpi_rank_env(environ)
    missing = [v for v in RANK_VARS if v not in environ]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not set. Fix: start this under a launcher "
                          f"that sets them (deepspeed, torchrun), or use --from slurm / mpi.")
    return {name: environ[name] for name in RANK_VARS}


def run_console_script(name: str, args: Sequence[str]) -> int:
    """Run an installed console script (mom-train) in this process: under MPI the process
    that initialised MPI must be the one that trains and exits."""
    found = entry_points(group="console_scripts", name=name)
    if not found:
        raise LaunchError(f"{name!r} is not an installed console script. Fix: pip install -e "
                          f". in the environment every node uses.")
    main = next(iter(found)).load()
    sys.argv = [name, *args]
    return int(main() or 0)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_parent() -> None:
    """SIGTERM this rank when its parent (the launcher's per-node process) dies: the rank
    then saves and stops (train/stopping.py) instead of training on unsupervised, racing a
    resubmitted job. Linux only; elsewhere nothing happens."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run(source: str, command: Sequence[str]) -> int:
    if not command:
        raise LaunchError("run: no command after --. Fix: ... run --from slurm -- mom-train "
                          "--config configs/tiny.yaml")
    stop_with_parent()
    env = rank_env(source)
    os.environ.update(env)
    rank = int(env["RANK"])
    if rank != 0:
        wait_for_master(env["MASTER_ADDR"], int(env["MASTER_PORT"]), MASTER_TIMEOUT_S, rank)
    return run_console_script(command[0], command[1:])


# ---------------------------------------------------------------------------- signals
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)  # HUP: as TERM
RANK_MARKER = ("mom_ds.launch_utils", "rank.py")  # how the ranks' command lines begin


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def is_rank_command(args: Sequence[str]) -> bool:
    """`python [-u] [-m] {rank.py,mom_ds.launch_utils} run ...`: the script is the first
    argument after the interpreter's options (the launchers' own command lines name
    rank.py further on)."""
    script = next((i for i, a in enumerate(args) if i and not a.startswith("-")), None)
    return script is not None and args[script].endswith(RANK_MARKER) \
        and list(args[script + 1:script + 2]) == ["run"]


def _is_rank(pid: int) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return is_rank_command(args)


def rank_pids(root: int) -> list[int]:
    """The per-rank processes (`... launch_utils run ...`) started below `root` on this
    node: the topmost matches, not their own children."""
    children, found, todo = _children(), [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            (found if _is_rank(child) else todo).append(child)
    return found


def supervise(command: Sequence[str]) -> int:
    """Run a launcher and give its ranks, not the launcher, the stop signals it receives.

    The deepspeed launcher dies on SIGTERM on one node, leaving its ranks training; on many
    nodes and in deepspeed.launcher.launch it answers SIGTERM/SIGINT by terminating the rank
    trees and SIGKILLs them 30 s later, which would cut a checkpoint save short. So the
    launcher runs in its own session (a terminal's Ctrl-C reaches only this process), each
    signal goes to the ranks on this node, and the launcher ends when they do. The ranks on
    other nodes learn of it through the stop flag they all-reduce (train/stopping.py)."""
    if not command:
        raise LaunchError("supervise: no launcher command after --")
    launcher = subprocess.Popen(list(command), start_new_session=True, stdin=subprocess.DEVNULL)

    def forward(signum: int, frame) -> None:
        signum = signal.SIGTERM if signum == signal.SIGHUP else signum
        ranks = rank_pids(launcher.pid)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not ranks:  # none started yet, all gone, or all over ssh (pdsh): end the launch;
            # a rank whose parent dies gets SIGTERM (stop_with_parent) and saves
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGTERM)
        print(f"mom-launch: {signal.Signals(signum).name} forwarded to {len(ranks)} rank(s) on "
              f"this node", file=sys.stderr, flush=True)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    code = launcher.wait()
    return code if code >= 0 else 128 - code


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m mom_ds.launch_utils", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-hostfile")
    check.add_argument("hostfile")
    check.add_argument("--need", type=int, default=1, help="ranks the run needs")
    gen = sub.add_parser("slurm-hostfile")
    gen.add_argument("--slots", type=int, required=True, help="processes (GPUs) per node")
    gen.add_argument("--out", help="file to write (default: stdout)")
    alloc = sub.add_parser("check-allocation")
    alloc.add_argument("--need", type=int, default=1, help="ranks the submission asked for")
    sub.add_parser("supervise")
    start = sub.add_parser("run")
    start.add_argument("--from", dest="source", choices=("env", "slurm", "mpi"), required=True)
    # Everything after `--` belongs to mom-train (or the command to run), not to us.
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = parse_args(argv)
    from .config import ConfigError

    try:
        if args.command == "check-hostfile":
            hosts = read_hostfile(args.hostfile)
            total = sum(hosts.values())
            if total < args.need:
                raise LaunchError(f"{args.hostfile} offers {total} slots but the run needs "
                                  f"{args.need}. Fix: add hosts or slots.")
            print(f"{args.hostfile}: {len(hosts)} host(s), {total} slot(s): "
                  + ", ".join(f"{h}={s}" for h, s in hosts.items()))
        elif args.command == "slurm-hostfile":
            text = format_hostfile({host: args.slots for host in slurm_nodes()})
            if args.out:
                Path(args.out).write_text(text)
            else:
                sys.stdout.write(text)
        elif args.command == "check-allocation":
            need, why = args.need, "the submission"
            run_config = train_run_config(rest)
            pinned = world_size_pinned_by(run_config)
            if pinned is not None and pinned > need:
                need, why = pinned, (f"train_batch_size in {run_config.parallel.deepspeed} "
                                     f"(micro_batch_size x grad_accum_steps x ranks)")
            tasks = check_allocation(os.environ, need, why)
            print(f"allocation: {tasks} task(s) for {need} needed rank(s)")
        elif args.command == "supervise":
            return supervise(rest)
        else:
            return run(args.source, rest)
    except (LaunchError, ConfigError) as err:
        print(f"mom-launch: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
