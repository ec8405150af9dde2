"""What the ranks of a multi-node run agree on before any expensive work, right after the
process group starts:

- none failed its start-up checks (preflight). A rank whose node lacks a file would
  otherwise exit alone, its message unprinted (only rank 0 prints), while the others wait
  for it at the rendezvous until the timeout;
- train.out_dir is one directory for all ranks: every rank writes its part of a checkpoint
  there and rank 0 publishes it, so node-local directories would leave each checkpoint
  scattered over the nodes;
- data.data_dir holds the same data on every rank: shared, or the same copy on each node
  (reading needs nothing more).
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from ..config import ConfigError, RunConfig
from .peers import Peer, where
from .preflight import StartCheck

SHARED_PROBE = ".mom-shared-check"


def agree(check: StartCheck, peers: list[Peer]) -> Any:
    """The check's result, or on every rank the error of the lowest rank that failed (rank
    0 prints it, naming the rank and host when it is not rank 0's own)."""
    errors: list[Optional[str]] = [None] * len(peers)
    dist.all_gather_object(errors, check.error)
    failed = [rank for rank, error in enumerate(errors) if error is not None]
    if failed:
        first = failed[0]
        origin = "" if first == 0 else f"on {where([peers[first]])}: "
        others = f" ({len(failed) - 1} more rank(s) failed too)" if len(failed) > 1 else ""
        raise ConfigError(f"{origin}{errors[first]}{others}")
    return check.result


def check_shared_storage(run: RunConfig, peers: list[Peer]) -> None:
    """train.out_dir is one directory for all ranks; data.data_dir the same data on each."""
    rank = dist.get_rank()
    out_dir = Path(run.train.out_dir)
    probe = out_dir / SHARED_PROBE
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    if rank == 0:
        probe.write_text(token[0])
    dist.barrier()
    seen = [None] * len(peers)
    dist.all_gather_object(seen, probe.is_file() and probe.read_text() == token[0])
    dist.barrier()  # everyone has looked before it goes
    if rank == 0:
        probe.unlink()
    blind = [p for p, ok in zip(peers, seen) if not ok]
    if blind:
        raise ConfigError(
            f"train.out_dir = {str(out_dir)!r} is not one directory for all ranks: "
            f"{where(blind)} cannot see the file rank 0 on {peers[0].host} wrote there. "
            f"Every rank writes its part of each checkpoint into it and rank 0 publishes it. "
            f"Fix: put train.out_dir on a file system every node mounts (NFS, Lustre, ...).")
    prints: list[Optional[dict]] = [None] * len(peers)
    dist.all_gather_object(prints, run.data.fingerprint)  # run_data.data_fingerprint
    other = [p for p, fp in zip(peers, prints) if fp != prints[0]]
    if other:
        raise ConfigError(
            f"data.data_dir = {run.data.data_dir!r} holds other data for {where(other)} than "
            f"for rank 0 on {peers[0].host}. Fix: the same mom-prep output at that path on "
            f"every node (a shared file system, or one copy per node).")
