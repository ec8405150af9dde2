"""Run a function on N local ranks (torch.multiprocessing + gloo), with a hard timeout.

Every rank calls fn(rank, world_size, *args) once the process group has started (the one
way mom-ds starts it: mom_ds.parallel.process_group.start); what rank r
returns comes back in the r-th slot. A rank that raises makes the whole call raise with
that rank's traceback; a rank that hangs is killed after `timeout` seconds.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

from mom_ds.parallel import process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args, collective_timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    result_path = Path(out_dir) / f"rank{rank}.pt"
    try:
        process_group.start("gloo", timedelta(seconds=collective_timeout))
        torch.save({"ok": fn(rank, world_size, *args)}, result_path)
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank named
        torch.save({"error": traceback.format_exc()}, result_path)


def run_ranks(fn, world_size: int, *args, timeout: float = 240, collective_timeout: float = 60):
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, out_dir, fn, args,
                                                   collective_timeout)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout} s")
        results = []
        for r in range(world_size):
            path = Path(out_dir) / f"rank{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} died without a result (exit code "
                                   f"{procs[r].exitcode})")
            data = torch.load(path, weights_only=False)
            if "error" in data:
                raise RuntimeError(f"rank {r} failed:\n{data['error']}")
            results.append(data["ok"])
        return results
