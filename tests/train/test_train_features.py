"""Trainer features through real mom-train runs on one process: activation checkpointing
and the whole-logits loss follow the default run, torch.compile follows eager, and the
profiler writes a trace that names the routed blocks' phases (multi-rank and ZeRO-3
variants: test_train_multirank.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mom_ds_testing.runs import (REPO, metrics, mom_train, run_python, tiny_args,
                                 trace_event_names)

pytestmark = pytest.mark.slow
STEPS = ["--train.max_steps", "5", "--train.eval_interval", "5", "--train.ckpt_interval", "0"]
DROPOUT = ["--model.dropout", "0.1"]  # the recompute must draw the same masks


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reference"
    mom_train(*tiny_args(data, out, *STEPS, *DROPOUT))
    return out


def assert_same_curve(got: Path, want: Path, rel: float) -> None:
    g, w = metrics(got), metrics(want)
    for step in range(1, 6):
        assert g[step]["train/loss"] == pytest.approx(w[step]["train/loss"], rel=rel), step
    assert g[5]["eval/loss"] == pytest.approx(w[5]["eval/loss"], rel=rel)


@pytest.mark.parametrize("mode", ["layer", "block"])
def test_activation_checkpointing_follows_the_unchecked_run(data, reference, tmp_path, mode):
    out = tmp_path / mode
    mom_train(*tiny_args(data, out, *STEPS, *DROPOUT, "--train.activation_checkpointing", mode))
    assert_same_curve(out, reference, 1e-6)


def test_whole_logits_follow_the_chunked_loss(data, reference, tmp_path):
    out = tmp_path / "whole"
    mom_train(*tiny_args(data, out, *STEPS, *DROPOUT, "--train.loss_chunk_tokens", "0"))
    assert_same_curve(out, reference, 1e-6)


def test_compiled_run_follows_eager(data, tmp_path):
    """Without dropout: compiled code draws its dropout masks from inductor's own generator,
    so with dropout the two runs differ by their masks, not by their arithmetic."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    shallow = ["--model.depth", "2"]  # inductor's compile time grows with the unrolled steps
    mom_train(*tiny_args(data, eager, *STEPS, *shallow))
    proc = mom_train(*tiny_args(data, compiled, *STEPS, *shallow, "--train.compile", "true"),
                     timeout=900)
    assert "torch.compile: 3 parts" in proc.stdout  # 2 vanilla layers, the routed block
    assert_same_curve(compiled, eager, 1e-5)


def test_profiler_trace_names_the_phases_and_the_report_points_to_it(data, tmp_path):
    out = tmp_path / "profiled"
    proc = mom_train(*tiny_args(data, out, *STEPS, "--train.profile_steps", "2,4"))
    assert f"profiler trace of steps 3-4 in {out / 'profile'}" in proc.stdout
    assert {"route", "permute", "compute", "combine", "attention"} <= \
        trace_event_names(out / "profile")
    report = run_python(["-m", "mom_ds.cli.report", str(out)])
    assert report.returncode == 0, report.stderr
    assert "profiler traces (train.profile_steps)" in report.stdout


def test_bad_feature_values_are_one_message(data, tmp_path):
    for args, message in ((["--train.activation_checkpointing", "all"],
                           "train.activation_checkpointing = 'all': is not one of"),
                          (["--train.profile_steps", "4,2"], "train.profile_steps = [4, 2]"),
                          (["--train.loss_chunk_tokens", "-1"], "train.loss_chunk_tokens = -1"),
                          (["--train.compile", "true", "--deepspeed",
                            str(REPO / "ds_configs" / "zero3.json")],
                           "train.compile = true does not work with ZeRO stage 3")):
        proc = run_python(["-m", "mom_ds.cli.train", *tiny_args(data, tmp_path / "x", *args)])
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-500:]
        assert "Traceback" not in proc.stderr
