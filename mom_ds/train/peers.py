"""Which rank runs on which host, and what a surviving rank says when another is lost.

A rank that dies (its node crashed, was preempted, lost its network) shows up on the
others as a failed collective: gloo's "Connection reset by peer" at once when the process
is gone, or the process group's timeout (parallel.timeout_minutes) when the network is.
Neither names the rank. So each survivor checks in at the rendezvous store (the TCPStore on
rank 0's host that every rank already reaches) and waits a few seconds for the others:
whoever does not check in is lost, and the table gathered at start names its host.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from .. import engine_adapter as adapter
from ..errors import LOST_RANK
from ..checkpoints.published import latest_tag

CHECK_IN_WAIT_S = 15.0  # survivors reach their own failed collective within seconds of each other


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str


class LostRankError(RuntimeError):
    """A collective failed because a rank (or the network to it) is gone; exit code 4.
    `report` is True on the rank that prints the message (the lowest survivor, or every
    rank when rank 0's store is gone too)."""
    exit_code = LOST_RANK

    def __init__(self, message: str, report: bool):
        super().__init__(message)
        self.report = report


def gather_peers() -> list[Peer]:
    hosts: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return [Peer(rank, host) for rank, host in enumerate(hosts)]


def describe(peers: list[Peer]) -> str:
    """'2 rank(s) on 2 host(s): rank 0 on mom-a; rank 1 on mom-b'."""
    return f"{len(peers)} rank(s) on {len({p.host for p in peers})} host(s): {where(peers)}"


def where(peers: list[Peer]) -> str:
    """'rank 1 on mom-b; ranks 2-3 on mom-c': the ranks grouped by host."""
    by_host: dict[str, list[int]] = {}
    for peer in peers:
        by_host.setdefault(peer.host, []).append(peer.rank)
    return "; ".join(f"{_ranks_text(ranks)} on {host}" for host, ranks in by_host.items())


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed for want of a peer: torch's Dist*Error (NCCL, the store), or
    gloo's RuntimeError (a reset connection, a timeout), whose message names its source."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and "/gloo/" in str(err))


def lost_rank_error(err: BaseException, peers: list[Peer], rank: int, step: int,
                    ckpt_dir: Path) -> LostRankError:
    """Which ranks are gone (those that do not check in), as one error naming them, their
    hosts, the failed step and the checkpoint to resume from."""
    missing, store_lost = _check_in(rank, len(peers))
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    if store_lost:
        lost = f"the master, rank 0 on {peers[0].host} (its rendezvous store is gone too)"
        survivors = []
    else:
        lost = where([peers[r] for r in missing])
        survivors = [r for r in range(len(peers)) if r not in missing]
    tag = latest_tag(ckpt_dir)
    resume = (f"the last complete checkpoint is {tag}: once every host is back, restart the "
              f"same launch with --resume" if tag else
              "no checkpoint was published yet: restart the run once every host is back")
    message = (f"lost {lost or 'a rank (all ranks checked in: a network fault?)'} during step "
               f"{step + 1} ({first_line}). {resume}.")
    return LostRankError(message, report=not survivors or rank == min(survivors))


def _check_in(rank: int, world: int) -> tuple[list[int], bool]:
    """(ranks that did not check in within CHECK_IN_WAIT_S, whether the store is gone).
    A process checks in at most once: it exits after its first lost peer."""
    store = adapter.rendezvous_store()
    store.set_timeout(timedelta(seconds=CHECK_IN_WAIT_S))
    key = "mom/survivors/"
    try:
        store.set(f"{key}{rank}", b"1")
        deadline = time.monotonic() + CHECK_IN_WAIT_S
        while True:
            missing = [r for r in range(world) if not store.check([f"{key}{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing, False
            time.sleep(0.5)
    except (RuntimeError, dist.DistError):  # the store's host (rank 0's) is unreachable
        return [0], True
