"""A run directory is one run's: a lock refuses a second mom-train into it (naming the
holder) and takes over a dead holder's; the run remembers its data (a resume, mom-eval and
mom-generate refuse other data, naming the difference, unless --allow-data-change) and its
tokenizer; a resume applies, refuses or ignores each changed config field by one rule, and
config.yaml is the newest checkpoint's."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mom_ds_testing.runs import REPO, env, metrics, mom_train, run_python, tiny_args, \
    write_byte_data


def train(*args: str) -> subprocess.CompletedProcess:
    return run_python(["-m", "mom_ds.cli.train", *args])


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def refused(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    """The one error line of a refused command (exit 2, no traceback), holding `phrases`."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mom-") and ": error: " in line, proc.stderr[-2000:]
    for phrase in phrases:
        assert phrase in line, line
    return line


# --- the lock, by itself ------------------------------------------------------------------
def write_holder(out: Path, **fields) -> Path:
    from mom_ds.train.run_lock import LOCK_FILE

    out.mkdir(parents=True, exist_ok=True)
    record = dict(host=socket.gethostname(), pid=os.getpid(), pid_start=None,
                  started="then", command="mom-train --elsewhere", token="t0")
    (out / LOCK_FILE).write_text(json.dumps({**record, **fields}))
    return out / LOCK_FILE


def test_lock_judges_holders_by_pid_start_time_and_by_age_across_hosts(tmp_path, monkeypatch):
    from mom_ds.config import ConfigError
    from mom_ds.train.run_lock import STALE_AFTER_S, RunLock, process_start

    # this process, as recorded: alive
    write_holder(tmp_path / "a", pid_start=process_start(os.getpid()))
    with pytest.raises(ConfigError, match=f"in use by another mom-train: pid {os.getpid()} on "):
        RunLock(tmp_path / "a").acquire()
    # the same pid with another start time: the pid was reused, the holder is dead
    write_holder(tmp_path / "b", pid_start=process_start(os.getpid()) + 1)
    lock = RunLock(tmp_path / "b")
    assert "its pid now belongs to another process" in lock.acquire()
    assert json.loads(lock.path.read_text())["token"] == lock.holder.token
    lock.release()
    assert not lock.path.exists()
    # another host: alive while it refreshes the file, stale once it stopped for long
    path = write_holder(tmp_path / "c", host="node-that-is-not-here")
    with pytest.raises(ConfigError, match="pid .* on node-that-is-not-here"):
        RunLock(tmp_path / "c").acquire()
    old = time.time() - STALE_AFTER_S - 5
    os.utime(path, (old, old))
    lock = RunLock(tmp_path / "c")
    assert "has not refreshed the lock" in lock.acquire()
    lock.release()
    # a requeued Slurm job: its earlier run is over, wherever it ran
    write_holder(tmp_path / "d", host="node-that-is-not-here", slurm="77.0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path / "d")
    assert "an earlier run of Slurm job 77" in lock.acquire()
    lock.release()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny run of 8 steps stopped after its checkpoint of step 4, and its arguments."""
    root = tmp_path_factory.mktemp("stopped")
    data = write_byte_data(root / "data")
    args = tiny_args(data, root / "run", "--train.max_steps", "8", "--train.eval_interval", "4")
    mom_train(*args, "--stop-after", "4")
    return root / "run", args


def copy_of(stopped: tuple[Path, list[str]], out: Path) -> list[str]:
    """The stopped run copied to `out`; its arguments pointing there."""
    shutil.copytree(stopped[0], out)
    args = list(stopped[1])
    args[args.index("--train.out_dir") + 1] = str(out)
    return args


def in_process(main, args: list[str], capsys) -> subprocess.CompletedProcess:
    """A command's main() run here (no interpreter to start), as a finished process."""
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_dead_holders_lock_taken_over(stopped, tmp_path,
                                                                     monkeypatch, capsys):
    from mom_ds.cli.train import main as mom_train_here

    out = tmp_path / "run"
    args = copy_of(stopped, out)
    before = snapshot(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from mom_ds.train.run_lock import RunLock\nRunLock(Path(sys.argv[1])).acquire()\n"
         "print('held', flush=True)\ntime.sleep(600)\n", str(out)],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = (out / ".mom-train.lock").read_bytes()
        # refused in the start-up checks, before any process group: run here as rank 0 of 1
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(name, value)
        for extra in (["--resume"], ["--overwrite"]):
            refused(in_process(mom_train_here, [*args, *extra], capsys),
                    "is in use by another mom-train",
                    f"pid {holder.pid} on {socket.gethostname()}")
        assert snapshot(out) == {**before, ".mom-train.lock": lock}
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the next run names it and takes over
    proc = mom_train(*args, "--resume")
    assert f"took over the lock of {out} from pid {holder.pid}" in proc.stderr
    assert "that process no longer exists" in proc.stderr
    assert "resumed from step 4" in proc.stdout and not (out / ".mom-train.lock").exists()


# --- data ---------------------------------------------------------------------------------
def corpus(directory: Path, names: list[Path]) -> Path:
    directory.mkdir()
    for i, name in enumerate(names):
        (directory / f"{i}.txt").write_text(name.read_text())
    return directory


def prepare(source: Path, out: Path) -> Path:
    """A byte-level BPE of 300 tokens trained on `source`, and the tokens it makes of it."""
    from data_prep.cli import main as mom_prep

    assert mom_prep(["--source", str(source), "--train-tokenizer", "300", "--out", str(out),
                     "--val-fraction", "0.2", "--num-proc", "1", "--overwrite", "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_other_data_is_refused_and_the_run_keeps_its_tokenizer(tmp_path, capsys):
    """The data directory prepared again from another corpus, with another tokenizer of the
    same vocabulary: each command names the difference; with --allow-data-change it runs,
    says so, and the run records it. mom-generate decodes with the run's own tokenizer."""
    from mom_ds.cli.evaluate import main as mom_eval
    from mom_ds.cli.generate import main as mom_generate

    stdlib = sorted(Path(os.__file__).parent.glob("*.py"))
    first = corpus(tmp_path / "a", stdlib[:30])
    second = corpus(tmp_path / "b", stdlib[-30:])
    data, out = prepare(first, tmp_path / "data"), tmp_path / "run"
    args = tiny_args(data, out, "--model.vocab_size", "300", "--train.max_steps", "8")
    mom_train(*args, "--stop-after", "4")
    generate = [str(out), "--prompt", "def main(", "--max-new-tokens", "24",
                "--temperature", "1"]
    before = in_process(mom_generate, generate, capsys)
    assert before.returncode == 0, before.stderr

    prepare(second, data)
    kept = snapshot(out)
    line = refused(train(*args, "--resume"), "is not the data the checkpoint was trained on",
                   "tokenizer 'byte-level BPE of 300 tokens trained on the train split' has other "
                   "files than the run's", "train.bin is ", "bytes, the run was trained on ",
                   "--allow-data-change")
    assert snapshot(out) == kept, line
    refused(in_process(mom_eval, [str(out)], capsys), "has other files", "val.bin is ")
    refused(in_process(mom_generate, [*generate, "--data-dir", str(data)], capsys),
            "is not the tokenizer", "has other files")
    after = in_process(mom_generate, generate, capsys)  # the run's tokenizer: as before
    assert after.returncode == 0 and after.stdout == before.stdout, after.stderr
    other = in_process(mom_generate, [*generate, "--data-dir", str(data),
                                      "--allow-data-change"], capsys)
    assert other.returncode == 0 and "--allow-data-change: using" in other.stderr
    assert other.stdout != before.stdout  # what decoding with the data's tokenizer gives
    from mom_ds.cli.convert import main as mom_convert  # the export takes the run's too
    refused(in_process(mom_convert, ["to-hf", str(out), str(tmp_path / "hf"), "--data-dir",
                                     str(data)], capsys), "is not the tokenizer")
    assert in_process(mom_convert, ["to-hf", str(out), str(tmp_path / "hf")],
                      capsys).returncode == 0
    from transformers import AutoTokenizer
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    from mom_ds.train.run_data import load_run_tokenizer, run_tokenizer_dir
    own = load_run_tokenizer(run_tokenizer_dir(out))
    assert exported.encode("def main(") == [int(t) for t in own.encode("def main(")]

    proc = in_process(mom_eval, [str(out), "--allow-data-change"], capsys)
    assert proc.returncode == 0 and "mom-eval: warning: --allow-data-change" in proc.stderr
    proc = mom_train(*args, "--resume", "--allow-data-change")
    assert "--allow-data-change: training on other data from step 4" in proc.stderr
    record = yaml.safe_load((out / "config.yaml").read_text())["data"]["fingerprint"]
    assert record["allowed_changes"][0].startswith("from step 4: tokenizer ")
    assert record["splits"]["val"]["bytes"] == (data / "val.bin").stat().st_size


# --- config -------------------------------------------------------------------------------
@pytest.mark.slow
def test_each_changed_field_on_resume_follows_its_rule(stopped, tmp_path, capsys):
    from mom_ds.cli.generate import main as mom_generate

    out = tmp_path / "run"
    args = copy_of(stopped, out)
    kept = snapshot(out)
    line = refused(train(*args, "--model.depth", "2", "--model.top_k", "2", "--data.seq_len",
                         "32", "--train.lr", "1e-3", "--resume"),
                   "model.depth 2 (the checkpoint's: ", "model.top_k 2 (the checkpoint's: 1)",
                   "data.seq_len 32 (the checkpoint's: 64)")
    assert "train.lr" not in line  # applied, not refused
    refused(train(*args, "--train.max_steps", "4", "--resume"),
            "train.max_steps 4 <= the checkpoint's step 4")
    assert snapshot(out) == kept  # config.yaml included, byte for byte
    # a resume that dies before its first checkpoint (diverged) leaves config.yaml the
    # checkpoint's: it is written when a checkpoint is published, not at the start
    proc = train(*args, "--train.lr", "1e6", "--train.min_lr", "1e5", "--resume")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert (out / "config.yaml").read_bytes() == kept["config.yaml"]
    proc = mom_train(*args, "--train.lr", "5e-4", "--train.min_lr", "5e-5", "--resume")
    assert "resuming with a changed config, applied from step 5: train.lr 0.003 -> 0.0005, " \
           "train.min_lr 0.0003 -> 5e-05" in proc.stdout
    from mom_ds.config import load_run_config
    from mom_ds.train.optimizer import lr_factor

    new = load_run_config(None, ["--train.lr", "5e-4", "--train.min_lr", "5e-5",
                                 "--train.max_steps", "8", "--train.warmup_steps", "2"]).train
    got = metrics(out)
    for step in range(5, 9):  # the new rate from the resume step on
        assert got[step]["train/lr"] == pytest.approx(5e-4 * lr_factor(step - 1, new)), step
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["lr"] == 5e-4  # written with step 8's checkpoint
    # mom-generate caps the new tokens to the room the model has left, and says so
    room = config["model"]["n_positions"] - len("def main(")  # bytes: a token per byte
    proc = in_process(mom_generate, [str(out), "--prompt", "def main(", "--max-new-tokens",
                                     "100000", "--temperature", "0"], capsys)
    assert proc.returncode == 0, proc.stderr
    assert f"mom-generate: note: --max-new-tokens 100000 capped to {room}" in proc.stderr


def test_a_checkpoint_from_an_older_mom_ds_resumes_with_a_warning():
    """Fields it lacks (data.fingerprint, a newer train field) are not compared; that its
    data cannot be checked is said."""
    from mom_ds.config import load_run_config
    from mom_ds.train.resume_rules import check_resume

    run = load_run_config(REPO / "configs" / "tiny.yaml")
    run.data.fingerprint = {"tokenizer": {"spec": "bytes"}, "splits": {}}
    saved = run.to_dict()
    del saved["data"]["fingerprint"], saved["train"]["eps"]
    saved["train"]["lr"] = 1e-3
    applied, warnings = check_resume(run, saved, 4, allow_data_change=False)
    assert applied == [f"train.lr 0.001 -> {run.train.lr!r}"]
    assert len(warnings) == 1 and "records no data fingerprint" in warnings[0]


def test_every_config_field_has_a_rule():
    """(The table docs/training.md shows is checked in tests/project/test_docs.py.)"""
    from mom_ds.train.resume_rules import RULES, fields, rule_for

    named = {f"{s}.{n}" for s, n in fields()}
    assert {key for key in RULES if "." in key} <= named  # no rule for a field that is gone
    assert all(rule_for(s, n) for s, n in fields())
