"""mom-eval and mom-generate on several ranks (issue 23 item 2): under torchrun, a
checkpoint's module pools are sharded over the ranks (expert parallelism, through the same
parallelize and process-group start as training) and the numbers are those of one process:
the same windows give the same loss, greedy decoding the same text."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mom_ds_testing.multirank import free_port
from mom_ds_testing.runs import REPO, env, mom_train, tiny_args

pytestmark = pytest.mark.slow


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def on_ranks(module: str, *args: str) -> str:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    return run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()),
                "-m", module, *args])


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_ranks") / "run"
    mom_train(*tiny_args(data, out, "--train.max_steps", "4", "--train.eval_interval", "4"))
    return out


def test_mom_eval_on_two_ranks_scores_as_one_process(trained):
    windows = ["--max-windows", "32", "--batch-size", "4", "--json"]
    one = json.loads(run([sys.executable, "-m", "mom_ds.cli.evaluate", str(trained), *windows]))
    two = json.loads(on_ranks("mom_ds.cli.evaluate", str(trained), *windows).strip()
                     .splitlines()[-1])
    assert (one["ranks"], one["expert_parallel_size"]) == (1, 1)
    assert (two["ranks"], two["expert_parallel_size"]) == (2, 2)
    # each rank holds half of every pool: fewer parameters than the whole model
    assert two["parameters_on_rank0"] < one["parameters_on_rank0"]
    assert two["windows"] == one["windows"] == 32 and two["tokens"] == one["tokens"]
    # the same rows through the same modules; only the GEMMs' summation order may differ
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["flops_per_token"] == pytest.approx(one["flops_per_token"], rel=1e-9)


def test_mom_eval_on_two_ranks_is_the_validation_of_a_two_rank_run(trained):
    """Without --max-windows, W ranks score what a W-rank run's validation reads: the run's
    eval_batches x micro_batch_size windows per rank."""
    two = json.loads(on_ranks("mom_ds.cli.evaluate", str(trained), "--json").strip()
                     .splitlines()[-1])
    assert two["windows"] == 2 * 8 * 2  # tiny_args: eval_batches 2; the recipe's micro 8


def test_mom_generate_on_two_ranks_samples_as_one_process(trained):
    prompt = ["--prompt", "def main(", "--max-new-tokens", "12", "--temperature", "0"]
    one = run([sys.executable, "-m", "mom_ds.cli.generate", str(trained), *prompt])
    two = on_ranks("mom_ds.cli.generate", str(trained), *prompt)
    assert one.startswith("def main(") and len(one) > len("def main(\n")
    assert two == one  # rank 0 alone prints


def test_expert_parallel_size_must_divide_the_ranks(trained):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "mom_ds.cli.evaluate", str(trained),
                           "--expert-parallel-size", "3"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # torchrun's own code for a failed rank
    # one message (exit 2) before any process group; torchrun then stops the other rank
    assert "mom-eval: error: --expert-parallel-size 3 does not divide the 2 ranks. Fix: " \
        in proc.stderr, proc.stderr[-3000:]


def test_one_process_refuses_an_expert_parallel_size(trained):
    proc = subprocess.run([sys.executable, "-m", "mom_ds.cli.evaluate", str(trained),
                           "--expert-parallel-size", "2"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "mom-eval: error: --expert-parallel-size 2 needs that many ranks" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_sharded_load_takes_only_this_ranks_modules(trained):
    """On several ranks the model is built on the meta device and sharded before any weight
    is read: each pool tensor then holds exactly its rank's rows of the checkpoint (compared
    with the whole model one process loads), and no tensor is left on the meta device."""
    from mom_ds.checkpoints.loading import load_model
    from mom_ds.parallel.parallelize import shard_pool
    from mom_ds.parallel.placement import ModulePlacement

    _, whole, _ = load_model(trained)

    def second_of_two(model, run):
        for block in model.chunks:
            for pool in (block.attn_pool, block.ffn_pool):
                shard_pool(pool, ModulePlacement(pool.n_modules, 2, 1), "ep_size_2")

    _, model, _ = load_model(trained, shard=second_of_two)
    want = whole.state_dict()
    got = model.state_dict()
    assert not any(t.is_meta for t in got.values())
    assert sum(t.numel() for t in got.values()) < sum(t.numel() for t in want.values())
    for name, tensor in got.items():
        if "_pool." in name:  # modules 2 and 3 of 4
            assert torch.equal(tensor, want[name][2:]), name
        else:
            assert torch.equal(tensor, want[name]), name
