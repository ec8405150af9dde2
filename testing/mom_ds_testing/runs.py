"""Shared helpers of the training tests: a tiny byte-level dataset on disk and a runner for
mom-train in a subprocess (with a timeout, so a hung collective fails the test)."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # installed editable: the checkout
TINY = REPO / "configs" / "tiny.yaml"


def write_byte_data(out: Path) -> Path:
    """The built-in corpus (the stdlib's source) as bytes, through mom-prep itself."""
    from data_prep.cli import main as mom_prep

    assert mom_prep(["--source", "builtin", "--tokenizer", "bytes", "--out", str(out)]) == 0
    return out


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return e


def run_python(args: list[str], timeout: int = 240, cwd: Path = REPO
               ) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc


def mom_train(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """One-process mom-train; fails the test with its output when it fails."""
    proc = run_python(["-m", "mom_ds.cli.train", *args], timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"mom-train {' '.join(args)} exited {proc.returncode}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(out_dir: Path) -> dict[int, dict[str, float]]:
    """step -> merged scalars from metrics.jsonl (the last write of a name wins)."""
    rows: dict[int, dict[str, float]] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("step"), {}).update(row)
    return rows


def poisoned_forward(call: int, rank: str = "") -> str:
    """Python source that makes the model's `call`-th training forward (1-based) return a NaN
    loss, on every rank or only on `rank`: a fault injected from outside the code under
    test. Run it before mom-train's main."""
    return f"""
import os
from mom_ds.model.model import MoMForCausalLM
forward, calls = MoMForCausalLM.forward, [0]
def poisoned(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    if self.training and {rank!r} in ("", os.environ.get("RANK")):
        calls[0] += 1
        if calls[0] == {call}:
            out.loss = out.loss * float("nan")
    return out
MoMForCausalLM.forward = poisoned
"""


def trace_event_names(profile_dir: Path, rank: int = 0) -> set[str]:
    """The event names of rank `rank`'s torch.profiler trace in a run's profile/."""
    trace, = profile_dir.glob(f"rank{rank}*.pt.trace.json*")
    with (gzip.open if trace.suffix == ".gz" else open)(trace, "rt") as f:
        return {event.get("name") for event in json.load(f)["traceEvents"]}


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    """The tiny recipe, shrunk to a few fast steps; fp32 (CPU)."""
    return ["--config", str(TINY), "--data.data_dir", str(data), "--train.out_dir", str(out),
            "--train.max_steps", "12", "--train.warmup_steps", "2", "--train.log_interval", "1",
            "--train.eval_interval", "6", "--train.eval_batches", "2",
            "--train.ckpt_interval", "4", "--train.keep_checkpoints", "0",
            "--train.precision", "fp32", "--data.seq_len", "64", *extra]

