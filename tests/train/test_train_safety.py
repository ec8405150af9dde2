"""Nothing lost on a bad day: a diverging run stops before it writes a checkpoint, a fresh run
refuses to replace another, a resumed run logs every step once and applies the recipe it
was given from the resume step on."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mom_ds_testing.runs import (REPO, env, metrics, mom_train, poisoned_forward, run_python,
                                 tiny_args)

pytestmark = pytest.mark.slow
DIVERGE = ["--train.lr", "1e6", "--train.min_lr", "1e5"]


def train(*args: str):
    return run_python(["-m", "mom_ds.cli.train", *args])


def test_a_diverging_run_stops_before_its_first_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    proc = train(*tiny_args(data, out, *DIVERGE, "--train.max_steps", "20",
                            "--train.log_interval", "10", "--train.ckpt_interval", "10"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("mom-train: error: the training loss is not finite at step ")
    assert "no checkpoint was published" in message and "Fix: lower train.lr" in message
    assert not (out / "ckpt").exists()
    assert "Traceback" not in proc.stderr


def test_a_run_diverging_after_a_checkpoint_keeps_it(data, tmp_path):
    """The good checkpoint of step 4 stays published, loads and scores a finite loss; the
    diverging resume (lr raised: the recipe applies from the resume step) writes nothing."""
    out = tmp_path / "run"
    mom_train(*tiny_args(data, out), "--stop-after", "4")
    proc = train(*tiny_args(data, out, *DIVERGE), "--resume")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"the last good checkpoint is {out / 'ckpt' / 'step_000004'}" in proc.stderr
    assert (out / "ckpt" / "latest").read_text() == "step_000004"
    assert sorted(p.name for p in (out / "ckpt").glob("step_*")) == ["step_000004"]
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(out), "--max-windows", "8"])
    assert proc.returncode == 0
    assert math.isfinite(float(proc.stdout.split("val loss ")[1].split()[0]))


def poisoned_train(call: int, *args: str):
    """mom-train with a NaN loss at the call-th training forward (one per step here)."""
    main = "import sys\nfrom mom_ds.cli.train import main\nsys.exit(main(sys.argv[1:]))\n"
    return run_python(["-c", poisoned_forward(call) + main, *args])


def test_skip_policy_leaves_a_non_finite_step_out_and_trains_on(data, tmp_path):
    from mom_ds.checkpoints.loading import consolidated_state_dict

    out = tmp_path / "run"
    proc = poisoned_train(3, *tiny_args(data, out, "--train.nan_policy", "skip",
                                          "--train.max_steps", "5", "--train.ckpt_interval", "1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = metrics(out)
    assert [rows[s]["train/skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert math.isnan(rows[3]["train/loss"]) and math.isfinite(rows[5]["eval/loss"])
    # the schedule did not advance on the skipped step: step 4 runs at step 3's rate
    assert rows[4]["train/lr"] == rows[3]["train/lr"] != rows[2]["train/lr"]
    weights = {s: consolidated_state_dict(out / "ckpt" / f"step_{s:06d}")[1] for s in (2, 3, 4)}
    assert all(torch.equal(weights[2][n], weights[3][n]) for n in weights[2])  # left out
    assert not all(torch.equal(weights[3][n], weights[4][n]) for n in weights[3])  # trained on
    assert "skipped 1" in proc.stdout


def test_stop_policy_ends_the_run_at_the_same_fault(data, tmp_path):
    out = tmp_path / "run"
    proc = poisoned_train(3, *tiny_args(data, out, "--train.max_steps", "5",
                                          "--train.ckpt_interval", "1"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "the training loss is not finite at step 3" in proc.stderr
    assert (out / "ckpt" / "latest").read_text() == "step_000002"


def test_skip_policy_stops_a_run_that_keeps_diverging(data, tmp_path):
    out = tmp_path / "run"
    proc = train(*tiny_args(data, out, *DIVERGE, "--train.nan_policy", "skip",
                            "--train.max_skipped_steps", "3", "--train.max_steps", "20",
                            "--train.ckpt_interval", "10"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert "steps in a row had a non-finite loss or gradient and were skipped" in message
    assert "(train.max_skipped_steps = 3)" in message and "Traceback" not in proc.stderr
    assert not (out / "ckpt").exists()


def test_skip_policy_refuses_fp32_without_zero(data, tmp_path):
    proc = train(*tiny_args(data, tmp_path / "run", "--train.nan_policy", "skip",
                            "--parallel.deepspeed", str(REPO / "ds_configs" / "zero0.json")))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "mom-train: error: train.nan_policy = 'skip' needs DeepSpeed's overflow check")
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_refuses_an_existing_run_directory(data, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(data, out, "--train.max_steps", "2", "--train.warmup_steps", "1",
                     "--train.ckpt_interval", "0")
    mom_train(*args)
    before = {name: (out / name).read_text() for name in ("config.yaml", "metrics.jsonl")}
    proc = train(*args, "--train.lr", "1e-3")
    assert proc.returncode == 2
    assert "already holds a run (checkpoint step_000002)" in proc.stderr
    assert "--resume to continue it, --overwrite to replace it" in proc.stderr
    assert {name: (out / name).read_text() for name in before} == before
    assert train(*args, "--resume", "--overwrite").returncode == 2
    (out / "notes.txt").write_text("mine")
    mom_train(*args, "--train.lr", "1e-3", "--overwrite")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # the new run's only
    assert "lr: 0.001\n" in (out / "config.yaml").read_text()
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is replaced


def test_a_resume_logs_each_step_once_and_uses_the_new_recipe(data, tmp_path):
    """Saved at 4 and 6; `latest` set back to 4 as if the process died before publishing 6:
    the resume replays 5 and 6, and metrics.jsonl and TensorBoard hold each step once, with
    the values of the resumed run. Its --train.lr applies from step 5 on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mom_ds.config import load_run_config
    from mom_ds.train.optimizer import lr_factor

    out = tmp_path / "run"
    mom_train(*tiny_args(data, out), "--stop-after", "6")
    (out / "ckpt" / "latest").write_text("step_000004")
    mom_train(*tiny_args(data, out, "--train.lr", "1e-3", "--train.min_lr", "1e-4"), "--resume")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, 13))
    events = EventAccumulator(str(out / "tb")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    new = load_run_config(None, ["--train.lr", "1e-3", "--train.min_lr", "1e-4",
                                 "--train.max_steps", "12", "--train.warmup_steps", "2"]).train
    got = metrics(out)
    for step in range(5, 13):
        assert got[step]["train/lr"] == pytest.approx(1e-3 * lr_factor(step - 1, new)), step


def test_commands_end_bad_input_with_one_line(data, tmp_path):
    """No traceback around a message: bad paths and bad argument values, every command; and
    a run trained with a relative data directory evaluates from anywhere."""
    cases = [
        (["-m", "mom_ds.cli.evaluate", str(tmp_path / "nothing")], "mom-eval: error: ",
         "holds no complete checkpoint"),
        (["-m", "mom_ds.cli.evaluate", str(tmp_path), "--max-windows", "0"], "mom-eval: error:",
         "0 is not a positive integer"),
        (["-m", "mom_ds.cli.generate", str(tmp_path), "--prompt", "x", "--top-k", "0"],
         "mom-generate: error:", "0 is not a positive integer"),
        (["-m", "mom_ds.cli.generate", str(tmp_path), "--prompt", "x", "--top-p", "0"],
         "mom-generate: error:", "must lie in (0, 1]"),
        (["-m", "mom_ds.cli.generate", str(tmp_path), "--prompt", "x", "--temperature", "-1"],
         "mom-generate: error:", "must be >= 0"),
        (["-m", "mom_ds.cli.train", "--stop-after", "-3"], "mom-train: error:",
         "-3 is not a positive integer"),
        (["-m", "mom_ds.cli.convert", "to-hf", str(tmp_path / "nothing"), str(tmp_path / "o")],
         "mom-convert: error: ", "holds no complete checkpoint"),
        (["-m", "mom_ds.cli.assemble", str(tmp_path / "nothing"), "--list"],
         "mom-assemble: error: ", "holds no complete checkpoint"),
    ]
    for args, prefix, words in cases:
        proc = run_python(args)
        assert proc.returncode == 2, (args, proc.stderr[-1500:])
        assert prefix in proc.stderr and words in proc.stderr, (args, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr, args
    out = tmp_path / "run"
    args = [a if a != str(data) else data.name for a in
            tiny_args(data, out, "--train.max_steps", "2", "--train.warmup_steps", "1",
                      "--deepspeed", str(REPO / "ds_configs" / "zero1.json"))]
    assert run_python(["-m", "mom_ds.cli.train", *args], cwd=data.parent).returncode == 0
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(out), "--max-windows", "4"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1500:]


def corrupt(data: Path, tmp_path: Path, token: int, value: int) -> Path:
    """A copy of the data directory with one token of train.bin replaced."""
    import shutil

    import numpy as np

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    tokens = np.memmap(copy / "train.bin", dtype=np.uint16, mode="r+")
    tokens[token] = value
    tokens.flush()
    return copy


def test_token_ids_outside_the_vocabulary_are_named_before_they_reach_the_model(data, tmp_path):
    from mom_ds.data import DataError, TokenizedDataset

    meta = json.loads((data / "meta.json").read_text())
    assert meta["splits"]["train"]["max_token_id"] == 256  # the byte vocabulary, eot included
    # an id past the vocabulary, in the middle of the file: the window that holds it says so
    bad = corrupt(data, tmp_path / "a", 64 * 1000 + 7, 300)
    windows = TokenizedDataset(bad, split="train", seq_len=64)
    windows[999]
    with pytest.raises(DataError, match=r"train.bin: token 64007 is id 300, outside the "
                                        r"vocabulary of 257"):
        windows[1000]
    # ... and at the start of the file: mom-train's sample of windows finds it before any work
    bad = corrupt(data, tmp_path / "b", 3, 300)
    proc = train(*tiny_args(bad, tmp_path / "run"))
    assert proc.returncode == 2 and "token 3 is id 300" in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    # a meta.json whose vocabulary is smaller than the ids it records
    lying = tmp_path / "c"
    import shutil

    shutil.copytree(data, lying)
    meta["tokenizer"].update(vocab_size=200, eot_id=199)
    (lying / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="holds token id 256, outside the vocabulary of 200"):
        TokenizedDataset(lying, split="train", seq_len=64)


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory) -> Path:
    """A run with complete checkpoints at steps 4, 8 and 12."""
    out = tmp_path_factory.mktemp("saved") / "run"
    mom_train(*tiny_args(data, out))
    return out


def damaged_copy(saved: Path, tmp_path: Path, damage) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(saved, out)
    damage(out / "ckpt")
    return out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,cause,step", [
    (lambda c: (c / "latest").write_text("step_000099"), "step_000099 does not exist", 12),
    (lambda c: (c / "latest").write_text(""), "latest is empty", 12),
    (lambda c: (c / "step_000012" / "dense.pt").unlink(), "dense.pt is missing", 8),
    (lambda c: truncate(c / "step_000012" / "dense.pt"), "(truncated or overwritten)", 8),
    (lambda c: truncate(c / "step_000012" / "run_state_rank0.pt"), "run_state_rank0.pt is", 8),
])
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(saved, tmp_path, damage, cause,
                                                               step):
    out = damaged_copy(saved, tmp_path, damage)
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(out), "--max-windows", "4"])
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert cause in proc.stderr and "resuming from" in proc.stderr \
        and f"step_{step:06d}, the newest complete checkpoint" in proc.stderr, proc.stderr[-1500:]
    assert proc.stdout.startswith(f"step {step}:")


def test_resume_picks_the_newest_complete_or_the_named_checkpoint(data, saved, tmp_path):
    out = damaged_copy(saved, tmp_path, lambda c: truncate(c / "step_000012" / "dense.pt"))
    proc = train(*tiny_args(data, out, "--train.max_steps", "12"), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mom-train: warning: " in proc.stderr and "resumed from step 8" in proc.stdout
    truncate(out / "ckpt" / "step_000012" / "dense.pt")  # the resumed run wrote it again
    proc = train(*tiny_args(data, out), "--resume-from", "step_000004")
    assert proc.returncode == 0 and "resumed from step 4" in proc.stdout, proc.stderr[-2000:]
    proc = train(*tiny_args(data, out), "--resume-from", "step_000005")
    assert proc.returncode == 2 and "--resume-from step_000005:" in proc.stderr
    assert "step_000004" in proc.stderr and "Traceback" not in proc.stderr
    # nothing complete at all: every cause named
    for tag in ("step_000004", "step_000008", "step_000012"):
        truncate(out / "ckpt" / tag / "dense.pt")
    proc = train(*tiny_args(data, out), "--resume")
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
    assert proc.stderr.count("(truncated or overwritten)") == 3


FULL_DISK_AT_STEP_8 = """
import shutil, sys
real = shutil.disk_usage
calls = []
def disk_usage(path):
    calls.append(path)
    usage = real(path)
    return usage._replace(free=1024) if len(calls) >= 2 else usage  # full from the 2nd save on
shutil.disk_usage = disk_usage
from mom_ds.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_or_an_unwritable_run_directory_is_named(data, tmp_path):
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_AT_STEP_8)
    out = tmp_path / "run"
    proc = run_python([str(script), *tiny_args(data, out)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"no space left on {out / 'ckpt'} for the checkpoint of step 8: it needs about" \
        in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "ckpt" / "latest").read_text() == "step_000004"
    assert not (out / "ckpt" / "step_000008").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = train(*tiny_args(data, blocker / "run"))
    assert proc.returncode == 2 and "is not writable (Not a directory)" in proc.stderr


def test_mom_prep_names_what_changed_or_is_missing(tmp_path, shared_gpt2_tokenizer_dir):
    import shutil

    from data_prep.cli import main as mom_prep

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    base = ["--source", str(corpus), "--tokenizer", "bytes", "--val-fraction", "0.2", "--out",
            str(out), "--quiet"]
    assert mom_prep(base) == 0
    assert mom_prep(base) == 0  # unchanged: nothing to do
    corpus.write_text(corpus.read_text() + json.dumps({"text": "one more"}) + "\n")
    cases = [
        (base, "whose files have changed since"),
        (["--source", str(corpus), "--tokenizer", str(tmp_path / "no-such.json"), "--out",
          str(tmp_path / "o2")], "no such file or directory"),
    ]
    whitespace = tmp_path / "blank.jsonl"
    whitespace.write_text("".join(json.dumps({"text": " \n\t "}) + "\n" for _ in range(5)))
    cases.append((["--source", str(whitespace), "--tokenizer", "bytes", "--out",
                   str(tmp_path / "o3")], "only empty or whitespace documents"))
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"text": "only one document"}) + "\n")
    cases.append((["--source", str(single), "--tokenizer", "bytes", "--out", str(tmp_path / "o4")],
                  "too few for a val split"))
    for args, words in cases:
        proc = run_python(["-m", "data_prep.cli", *args])
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("mom-prep: error: ") \
            and words in proc.stderr, (args, proc.stderr[-1000:])
    # a directory with GPT-2's vocab.json + merges.txt is the GPT-2 tokenizer, no gpt2: needed
    plain = tmp_path / "gpt2files"
    shutil.copytree(shared_gpt2_tokenizer_dir, plain)
    assert mom_prep(["--source", str(corpus), "--tokenizer", str(plain), "--out",
                     str(tmp_path / "o5"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "o5" / "meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == 50257


def test_generate_and_eval_take_a_device_and_refuse_bytes_that_are_not_text(saved):
    import torch

    proc = run_python(["-m", "mom_ds.cli.generate", str(saved), "--prompt", "def ",
                       "--max-new-tokens", "5", "--device", "cpu"])
    assert proc.returncode == 0 and proc.stdout.startswith("def "), proc.stderr[-1500:]
    proc = subprocess.run([sys.executable, "-m", "mom_ds.cli.generate", str(saved), "--prompt",
                           b"caf\xe9", "--max-new-tokens", "5"], capture_output=True, text=True,
                          env=env(), cwd=REPO)
    assert proc.returncode == 2 and "--prompt is not valid UTF-8" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_python(["-m", "mom_ds.cli.evaluate", str(saved), "--device", "cuda"])
        assert proc.returncode == 2 and "this machine has no CUDA device" in proc.stderr
