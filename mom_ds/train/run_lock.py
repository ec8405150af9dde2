"""One run per directory: the lock file `<out_dir>/.mom-train.lock` that mom-train's rank 0
takes before it writes anything into train.out_dir, and removes when it ends.

The file holds its holder as JSON: host, pid, the pid's start time in clock ticks since
boot (/proc/PID/stat field 22: a pid reused by another process has another start time),
when it started, its command line, and a random token that tells this holder's file from
a successor's. It is created atomically (written under a private name, then os.link'ed to
the lock's name: link fails if the name exists, so exactly one of two racing starts wins,
and the file is never seen half-written).

A lock whose holder is dead is stale and taken over with a warning naming the holder:
- on the holder's own host, the pid is not alive, or is alive with another start time;
- from another host (a run directory on a shared file system) the pid cannot be asked, so
  the holder refreshes the file's mtime every HEARTBEAT_S seconds from a daemon thread, and
  a lock not refreshed for STALE_AFTER_S is stale. This needs the hosts' clocks to agree to
  well within STALE_AFTER_S (NTP on every cluster node does), and is why it is 10 beats:
  a busy holder (a long checkpoint write holds the GIL only in short stretches) is never
  mistaken for a dead one. flock(2) would need no clock, but Lustre refuses it unless
  mounted with -o flock and some NFS setups fake it per client, so it cannot be trusted on
  the file systems runs live on.
- an earlier run of the same Slurm job (the holder's SLURM_JOB_ID with another
  SLURM_RESTART_COUNT) is dead whatever its host: Slurm requeues a job only once all of it
  has ended, and a requeued job must not wait STALE_AFTER_S for the node it left.
A holder killed by SIGKILL (or os._exit) leaves its file behind; the next start on its host
sees the dead pid at once, one on another host after STALE_AFTER_S.
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..config import ConfigError

LOCK_FILE = ".mom-train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 10 * HEARTBEAT_S


@dataclass
class Holder:
    host: str
    pid: int
    pid_start: Optional[int]  # clock ticks after boot; None where /proc is not there
    started: str
    command: str
    token: str
    slurm: str = ""  # SLURM_JOB_ID.SLURM_RESTART_COUNT of the holder's job, if any

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"


def process_start(pid: int) -> Optional[int]:
    """The start time of process `pid` (clock ticks after boot), None if it does not exist
    or /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count after its last ')'
    return int(stat[stat.rindex(")") + 2:].split()[19])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def me() -> Holder:
    return Holder(host=socket.gethostname(), pid=os.getpid(), pid_start=process_start(os.getpid()),
                  started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
                  token=secrets.token_hex(8), slurm=slurm_run())


def slurm_run() -> str:
    job = os.environ.get("SLURM_JOB_ID", "")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else ""


def read_holder(path: Path) -> Optional[Holder]:
    """The lock's holder; None when the file vanished. A file that is not a holder record
    (cut by a full disk) is described as far as it can be and judged stale by its age."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return Holder(host="?", pid=0, pid_start=None, started="?",
                      command=f"unreadable lock file: {text[:60]!r}", token="")


def why_stale(holder: Holder, path: Path) -> Optional[str]:
    """Why the holder is dead, or None while it may be alive."""
    job, mine = holder.slurm.partition(".")[0], slurm_run()
    if job and mine and mine.partition(".")[0] == job and mine != holder.slurm:
        return f"it belongs to an earlier run of Slurm job {job}, which Slurm ended before " \
               f"requeueing it"
    if holder.host == socket.gethostname() and holder.pid:
        if not pid_alive(holder.pid):
            return "that process no longer exists"
        start = process_start(holder.pid)
        if holder.pid_start is not None and start is not None and start != holder.pid_start:
            return "its pid now belongs to another process"
        return None
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it was released meanwhile"
    if age > STALE_AFTER_S:
        return f"it has not refreshed the lock for {age:.0f} s (a live holder does every " \
               f"{HEARTBEAT_S:.0f} s)"
    return None


class RunLock:
    """The lock of one run directory, held by this process until release()."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.holder = me()
        self._stop = threading.Event()

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a warning when it took over a stale one. ConfigError naming
        the holder while a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        warning = None
        for _ in range(3):  # a stale lock removed, then a racing start may win the name
            if self._create():
                break
            holder = read_holder(self.path)
            if holder is None:
                continue
            cause = why_stale(holder, self.path)
            if cause is None:
                raise ConfigError(
                    f"train.out_dir = {str(self.path.parent)!r} is in use by another mom-train: "
                    f"{holder.describe()} (lock {self.path}). Fix: wait for it to end, stop it, "
                    f"or choose another --train.out_dir; if that process is gone (its host "
                    f"died), the lock is taken over {STALE_AFTER_S:.0f} s after its last "
                    f"refresh, or delete {self.path}.")
            if self._remove_stale(holder):
                warning = (f"took over the lock of {self.path.parent} from {holder.describe()}: "
                           f"{cause}")
        else:
            raise ConfigError(f"could not take the lock {self.path}: other starts keep taking "
                              f"it. Fix: start one mom-train per train.out_dir.")
        held[self.path] = self
        threading.Thread(target=self._beat, name="mom-run-lock", daemon=True).start()
        return warning

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.holder.token}")
        tmp.write_text(json.dumps(asdict(self.holder)))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _remove_stale(self, judged: Holder) -> bool:
        """Remove the lock file judged stale, unless a new holder replaced it meanwhile: it
        is renamed to a private name first (atomic), then checked to be the judged one."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{self.holder.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_holder(aside)
        if moved is not None and moved.token != judged.token:  # a live successor's: put back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the directory went away: nothing left to protect
                return

    def release(self) -> None:
        """Remove the lock file if it is still this holder's."""
        self._stop.set()
        held.pop(self.path, None)
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)


held: dict[Path, RunLock] = {}


def release_all() -> None:
    """Every lock this process holds (at exit, and when a run in this process ends)."""
    for lock in list(held.values()):
        lock.release()


atexit.register(release_all)
