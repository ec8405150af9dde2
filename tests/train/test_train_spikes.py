"""A loss that explodes while it stays finite: the spike watch (against a hand-computed
running mean), the stop before the next checkpoint, skipping back past the spike, and pruning
that never deletes the best checkpoint."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mom_ds_testing.runs import metrics, mom_train, run_python, tiny_args, write_byte_data

GOOD_STEPS = 8  # the base run's checkpoints: steps 4 and 8, val loss falling


def spike_args(data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_args(data, out, "--train.max_steps", "24", "--train.keep_checkpoints", "2",
                     *extra)


def test_spike_watch_against_a_hand_computed_mean():
    """Steps 1-4 set the mean (their plain mean, 4.0); 9.0 and 9.5 are spikes (> 2 x 4 and
    > 4 + 1) and stay out of it; 5.0 is not and enters it with weight 1/5."""
    from mom_ds.config import TrainConfig
    from mom_ds.train.health import Health, SpikeError

    health = Health(torch.device("cpu"), Path("/nonexistent"), TrainConfig(spike_steps=2))
    for step, loss in enumerate([4.5, 3.5, 4.2, 3.8, 9.0, 5.0], start=1):
        health.step_loss(step, torch.tensor(loss))
    assert health.state_dict() == {"loss_mean": pytest.approx(4.0 + (5.0 - 4.0) / 5),
                                   "loss_mean_steps": 5}
    health.check(6, None)  # one step above is not a spike of two
    health.step_loss(7, torch.tensor(9.5))
    health.step_loss(8, torch.tensor(float("nan")))  # nan_policy's business: breaks no run
    health.step_loss(9, torch.tensor(9.9))
    health.check(9, None)
    health.step_loss(10, torch.tensor(9.9))
    with pytest.raises(SpikeError, match=r"rose to 9\.9, above train.spike_factor 2 x its "
                                         r"running mean \(4\.2\).* at step 9:") as caught:
        health.check(10, None)
    assert caught.value.step == 9
    # the mean goes into the checkpoint: a resumed watch judges against the same history
    resumed = Health(torch.device("cpu"), Path("/nonexistent"), TrainConfig(spike_steps=1),
                     health.state_dict())
    resumed.step_loss(11, torch.tensor(9.0))
    with pytest.raises(SpikeError):
        resumed.check(11, None)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, Path]:
    """8 good steps (checkpoints 4 and 8), then runs copy it and resume."""
    data = write_byte_data(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("base") / "run"
    mom_train(*spike_args(data, out), "--stop-after", str(GOOD_STEPS))
    return data, out


def copy_run(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


def val_loss(run_dir: Path, tag: str) -> float:
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(run_dir / "ckpt" / tag),
                       "--max-windows", "8"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split("val loss ")[1].split()[0])


@pytest.mark.slow
def test_a_finite_explosion_stops_before_a_checkpoint(base_run, tmp_path):
    """Resumed at lr 10 the loss climbs into the thousands while finite (the issue's case:
    the run used to exit 0 and prune the good checkpoints): exit 3 before step 12's
    checkpoint, both good checkpoints kept, the message naming the last good one."""
    data, base = base_run
    out = copy_run(base, tmp_path)
    proc = run_python(["-m", "mom_ds.cli.train", *spike_args(data, out, "--train.lr", "10"),
                       "--resume"])
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mom-train: error: the training loss rose to ")
    assert "for 3 steps in a row (train.spike_steps) at step 10:" in line
    assert f"the last good checkpoint is {out / 'ckpt' / 'step_000008'}" in line
    assert "Traceback" not in proc.stderr
    # judged against the whole history: steps 1-8 (restored from the checkpoint) and 9
    rows = metrics(out)
    mean = sum(rows[s]["train/loss"] for s in range(1, 10)) / 9
    assert f"its running mean ({mean:.4g})" in line
    assert sorted(p.name for p in (out / "ckpt").glob("step_*")) == ["step_000004",
                                                                     "step_000008"]
    assert (out / "ckpt" / "latest").read_text() == "step_000008"


@pytest.mark.slow
def test_pruning_keeps_the_best_checkpoint(base_run, tmp_path):
    """With the watch off, lr 0.3 spoils every later checkpoint; keep_checkpoints 2 keeps the
    newest two and step 8, the best, which still scores its own val loss."""
    data, base = base_run
    out = copy_run(base, tmp_path)
    want = json.loads((base / "ckpt" / "best.json").read_text())
    assert want["tag"] == "step_000008"
    mom_train(*spike_args(data, out, "--train.lr", "0.3", "--train.spike_policy", "off"),
              "--resume")
    rows = metrics(out)
    assert all(rows[s]["eval/loss"] > want["eval_loss"] + 0.5 for s in (12, 16, 20, 24))
    assert sorted(p.name for p in (out / "ckpt").glob("step_*")) == [
        "step_000008", "step_000020", "step_000024"]
    assert json.loads((out / "ckpt" / "best.json").read_text()) == want
    assert val_loss(out, "step_000008") < val_loss(out, "step_000024") - 0.5


SPIKE_FORWARD = """
from mom_ds.model.model import MoMForCausalLM
forward, calls = MoMForCausalLM.forward, [0]
def spiking(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    if self.training:
        calls[0] += 1
        if {first} <= calls[0] <= {last}:
            out.loss = out.loss * 50
    return out
MoMForCausalLM.forward = spiking
import sys
from mom_ds.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_skip_goes_back_past_the_spike_and_trains_on(base_run, tmp_path):
    """Training forwards 2-4 after the resume (steps 10-12) return 50 x their loss: under
    spike_policy skip the run goes back to step 8 at step 12's check, skips the batches of
    steps 9-12, and ends normally; every step is logged once."""
    data, base = base_run
    out = copy_run(base, tmp_path)
    proc = run_python(["-c", SPIKE_FORWARD.format(first=2, last=4),
                       *spike_args(data, out, "--train.spike_policy", "skip"), "--resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"train.spike_policy skip: back to {out / 'ckpt' / 'step_000008'} (step 8), the "
            f"batches of steps 9-12 skipped") in proc.stdout
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if "train/loss" in r]
    assert train_steps == list(range(1, 25))
    rows = metrics(out)
    assert all(rows[s]["train/loss"] < 6 for s in range(9, 25))
    # step 9 after the skip trained on another batch than step 9 of a run without a spike
    clean = copy_run(base, tmp_path / "clean")
    mom_train(*spike_args(data, clean, "--train.max_steps", "24"), "--resume",
              "--stop-after", "9")
    assert metrics(clean)[9]["train/loss"] != rows[9]["train/loss"]
    assert math.isfinite(rows[24]["eval/loss"])
