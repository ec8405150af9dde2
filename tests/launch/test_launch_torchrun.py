"""torchrun is a supported launcher: 2 ranks under `torchrun --nproc-per-node 2 -m
mom_ds.cli.train` train the run the deepspeed launcher gives (same losses, same eval), and
neither prints a FutureWarning (torch 2.13 deprecates torch.distributed.nn.functional's
collectives and all_gather_into_tensor / reduce_scatter_tensor, which mom-ds and DeepSpeed's
ZeRO used)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mom_ds_testing.runs import REPO, env, metrics, tiny_args, write_byte_data

pytestmark = pytest.mark.slow
STEPS = 4
# E = 2 under ZeRO-1: the all-to-all, the routers' all-reduced balance statistics and
# ZeRO's all-gather of the updated partitions all run, and a checkpoint is written.
RUN = ["--train.max_steps", str(STEPS), "--train.eval_interval", str(STEPS),
       "--train.ckpt_interval", str(STEPS), "--train.micro_batch_size", "4",
       "--parallel.expert_parallel_size", "2",
       "--deepspeed", str(REPO / "ds_configs" / "zero1.json")]


def launch(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{cmd[0]} did not finish in 300 s (a hang?):\n{err.stdout}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    for tool in ("torchrun", "deepspeed", "mom-train"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not on PATH")
    root = tmp_path_factory.mktemp("torchrun")
    data = write_byte_data(root / "data")
    outs = {"torchrun": root / "torchrun", "deepspeed": root / "deepspeed"}
    return {
        "torchrun": (outs["torchrun"], launch(
            [shutil.which("torchrun"), "--nproc-per-node", "2", "--master-port", "29521",
             "-m", "mom_ds.cli.train", *tiny_args(data, outs["torchrun"]), *RUN])),
        "deepspeed": (outs["deepspeed"], launch(
            [shutil.which("deepspeed"), "--num_accelerators", "2", "--master_port", "29522",
             shutil.which("mom-train"),
             *tiny_args(data, outs["deepspeed"]), *RUN])),
    }


def test_torchrun_trains_as_the_deepspeed_launcher(runs):
    """Two CPU ranks are not bitwise reproducible run to run (test_train_multirank.py:
    1 ulp by step 3), hence 1e-6 relative; a rank that trained alone or a different batch
    moves the loss by 1e-2."""
    want, got = metrics(runs["deepspeed"][0]), metrics(runs["torchrun"][0])
    for step in range(1, STEPS + 1):
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=1e-6)
    assert got[STEPS]["eval/loss"] == pytest.approx(want[STEPS]["eval/loss"], rel=1e-6)
    assert got[STEPS]["train/tokens_seen"] == want[STEPS]["train/tokens_seen"]
    assert "2 rank(s)" in runs["torchrun"][1]
    assert (runs["torchrun"][0] / "ckpt" / "latest").read_text() == f"step_{STEPS:06d}"
    # DeepSpeed's CPU all-reduce buffers are released under torchrun too
    assert not list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*_29521_*"))


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_no_deprecation_warning(runs, launcher):
    assert "FutureWarning" not in runs[launcher][1]
