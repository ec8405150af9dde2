"""Two real test hosts on this machine, for the multi-node launcher tests.

Each host is a set of Linux namespaces held open by one `sleep` process:
- network: its own loopback and one end of a veth pair (10.231.7.1 <-> 10.231.7.2), so the
  hosts reach each other only over that link, never any other address;
- UTS: its own host name (`mom-a`, `mom-b`), which DeepSpeed, MPI, Slurm and mom-train see;
- mount: /etc/hosts naming both hosts (and no DNS), and NODE_LOCAL, a directory whose contents differ
  per host (everything else, the repository and /tmp included, is one shared file system).

Commands enter a host with nsenter. An sshd per host (keys made here) serves pdsh, ssh and
MPICH's launcher; the client side is an `ssh` shim first on PATH that uses this harness's
key and config, so nothing in ~/.ssh is read or written. On exit every process in either
network namespace is killed, so the namespaces and the veth pair vanish with them, also when
a test fails.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from .launchers import REPO, _spawn, _wait_for, env

SUBNET = "10.231.7"
HOST_NAMES = ("mom-a", "mom-b")
SSH_PORT = 22
VETH = ("mom0", "mom1")  # each host's end of the pair


@dataclass
class Host:
    name: str
    addr: str
    holder: subprocess.Popen  # the process whose namespaces are this host

    def enter(self, cmd: Sequence[str], cwd: Path = REPO) -> list[str]:
        """`cmd` run inside this host, in `cwd` (nsenter would start in /)."""
        return ["nsenter", "-t", str(self.holder.pid), "--net", "--uts", "--mount",
                f"--wd={cwd}", "--", *cmd]

    def netns_inode(self) -> int:
        return os.stat(f"/proc/{self.holder.pid}/ns/net").st_ino

    def processes(self) -> list[int]:
        """Pids of every process in this host's network namespace."""
        inode, pids = self.netns_inode(), []
        for ns in Path("/proc").glob("[0-9]*/ns/net"):
            try:
                if ns.stat().st_ino == inode:
                    pids.append(int(ns.parent.parent.name))
            except OSError:  # gone meanwhile
                continue
        return pids


class TwoHosts:
    def __init__(self, root: Path, hosts: list[Host]):
        self.root = root
        self.hosts = hosts
        self.node_local = root / "node-local"
        self.bin = root / "bin"  # the ssh shim
        self.procs: list[subprocess.Popen] = []

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def env(self, **extra: str) -> dict[str, str]:
        """The test environment with the ssh shim first on PATH."""
        out = env(**extra)
        out["PATH"] = f"{self.bin}:{out['PATH']}"
        return out

    def run(self, host: int, cmd: Sequence[str], timeout: float, cwd: Path = REPO,
            **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.hosts[host].enter(cmd, cwd), capture_output=True, text=True,
                              timeout=timeout, env=self.env(**extra_env))

    def spawn(self, host: int, cmd: Sequence[str], log: Path, cwd: Path = REPO,
              **extra_env: str) -> subprocess.Popen:
        """A long-running command on a host (stopped at exit with everything else there)."""
        proc = _spawn(self.hosts[host].enter(cmd, cwd), log, env=self.env(**extra_env))
        self.procs.append(proc)
        return proc

    def link(self, host: int, up: bool) -> None:
        """Bring a host's end of the veth pair up or down (a cable pulled and put back)."""
        dev = VETH[host]
        subprocess.run(self.hosts[host].enter(["ip", "link", "set", dev, "up" if up else "down"]),
                       check=True, timeout=30)

    def local_dir(self, host: int) -> Path:
        """Where NODE_LOCAL's contents of a host live, seen from outside the hosts."""
        return self.root / f"{self.hosts[host].name}-local"


def missing() -> str | None:
    """Why two namespace hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("unshare", "nsenter", "ip", "/usr/sbin/sshd", "ssh", "ssh-keygen", "pdsh"):
        if shutil.which(tool) is None:
            return f"{tool} not found (launch/ci_setup.sh installs iproute2, openssh and pdsh)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create namespaces: {probe.stderr.strip()}"
    return None


HOLDER = """set -e
hostname {name}
mount --bind {root}/hosts /etc/hosts
mount --bind {root}/nsswitch.conf /etc/nsswitch.conf
mount --bind {root}/{name}-local {root}/node-local
exec sleep infinity
"""

SSHD_CONFIG = """\
Port {port}
ListenAddress {addr}
HostKey {root}/ssh/host_key
AuthorizedKeysFile {root}/ssh/authorized_keys
PidFile {root}/ssh/sshd-{name}.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 100
"""

SSH_CONFIG = """\
Host {hosts}
    IdentityFile {root}/ssh/client_key
    Port {port}
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    # a host that stops answering ends its session (and pdsh's wait) within 15 s
    ServerAliveInterval 5
    ServerAliveCountMax 3
"""


@contextlib.contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    why = missing()
    if why:
        pytest.skip(f"no namespace hosts: {why}")
    root = Path(tempfile.mkdtemp(prefix="mom-hosts-"))
    root.chmod(0o755)
    cluster = TwoHosts(root, [])
    try:
        (root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{SUBNET}.{i + 1} {name}\n" for i, name in enumerate(HOST_NAMES)))
        # Names from that file only: a DNS server is unreachable from the hosts, and every
        # lookup (torch's reverse lookups of peers among them) would wait for its timeout.
        (root / "nsswitch.conf").write_text("passwd: files\ngroup: files\nshadow: files\n"
                                            "hosts: files\n")
        cluster.node_local.mkdir()
        for i, name in enumerate(HOST_NAMES):
            (root / f"{name}-local").mkdir()
            holder = subprocess.Popen(
                ["unshare", "--net", "--uts", "--mount", "--propagation", "private", "sh", "-c",
                 HOLDER.format(name=name, root=root)], start_new_session=True)
            cluster.hosts.append(Host(name, f"{SUBNET}.{i + 1}", holder))
        _link(cluster)
        _start_sshd(cluster)
        yield cluster
    finally:
        _tear_down(cluster)
        if os.environ.get("MOM_KEEP_HOSTS_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)


def _link(cluster: TwoHosts) -> None:
    """The veth pair, one end in each host, addresses up; waits until each host answers."""
    a, b = cluster.hosts
    for host in cluster.hosts:  # the holder has mounted and named the host
        _wait_for(lambda h=host: subprocess.run(
            h.enter(["hostname"]), capture_output=True, text=True).stdout.strip() == h.name,
            10, f"host {host.name}", Path("/dev/null"))
    # Created inside host a and moved: the root namespace never holds either end.
    subprocess.run(a.enter(["ip", "link", "add", VETH[0], "type", "veth", "peer", "name",
                            VETH[1], "netns", str(b.holder.pid)]), check=True, timeout=30)
    for host, dev in zip(cluster.hosts, VETH):
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{host.addr}/24", "dev", dev],
                    ["ip", "link", "set", dev, "up"]):
            subprocess.run(host.enter(cmd), check=True, timeout=30)


def _start_sshd(cluster: TwoHosts) -> None:
    root = cluster.root
    (root / "ssh").mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "ssh" / key)],
                       check=True, timeout=30)
    shutil.copy(root / "ssh" / "client_key.pub", root / "ssh" / "authorized_keys")
    (root / "ssh" / "config").write_text(SSH_CONFIG.format(
        hosts=" ".join(cluster.names), root=root, port=SSH_PORT))
    cluster.bin.mkdir()
    shim = cluster.bin / "ssh"
    shim.write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {root}/ssh/config \"$@\"\n")
    shim.chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    for host in cluster.hosts:
        conf = root / "ssh" / f"sshd-{host.name}.conf"
        conf.write_text(SSHD_CONFIG.format(port=SSH_PORT, addr=host.addr, root=root,
                                           name=host.name))
        cluster.spawn(cluster.hosts.index(host), ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                      root / f"sshd-{host.name}.log")
    for i, host in enumerate(cluster.hosts):
        other = cluster.hosts[1 - i]
        _wait_for(lambda i=i, other=other: cluster.run(
            i, ["ssh", other.name, "hostname"], timeout=20).stdout.strip() == other.name,
            20, f"ssh from {host.name} to {other.name}", root / f"sshd-{other.name}.log")


def _tear_down(cluster: TwoHosts) -> None:
    """Kill every process in both hosts (the daemons, ranks started over ssh or by slurmd),
    then the holders: the namespaces and the veth pair go with the last of them."""
    for host in cluster.hosts:
        if host.holder.poll() is None:
            for pid in host.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    for proc in [*cluster.procs, *(h.holder for h in cluster.hosts)]:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
