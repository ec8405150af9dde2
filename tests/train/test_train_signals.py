"""Stopping on a signal (README, "Preemption"): SIGTERM to a rank or to the deepspeed
launcher makes every rank finish its step, save a complete checkpoint and exit 5; the
continued run equals an uninterrupted one. A second SIGINT exits at once and publishes
nothing. `--resume auto` starts fresh where no checkpoint was ever completed (setting the
failed attempt's files aside) and resumes from a complete checkpoint that `latest` does
not name (issue 25, item 1: the Slurm script's start)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mom_ds_testing.launchers import env as launch_env
from mom_ds_testing.launchers import free_port, processes_with
from mom_ds_testing.runs import REPO, env, metrics, mom_train, tiny_args

pytestmark = pytest.mark.slow
STOPPED_EXIT = 5
STEPS = 40


def args(data: Path, out: Path, steps: int = STEPS) -> list[str]:
    """Enough steps that a signal lands mid-run; no checkpoint but the stop's and the end's."""
    return tiny_args(data, out, "--train.max_steps", str(steps), "--train.eval_interval", "0",
                     "--train.ckpt_interval", "1000")


class Running:
    """A process whose stdout is read as it comes (a thread), stderr kept in a file."""

    def __init__(self, cmd: list[str], environ: dict[str, str], stderr: Path):
        self.stderr_path = stderr
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE,
                                     stderr=open(stderr, "w"), text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, start: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith(start) for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no line {start!r} (exit {self.proc.poll()}):\n"
                            f"{''.join(self.lines)[-3000:]}\n{self.stderr()[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the reader thread drains the pipe
        return code, "".join(self.lines) + self.stderr()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def losses(out: Path) -> dict[int, float]:
    return {step: row["train/loss"] for step, row in metrics(out).items() if "train/loss" in row}


def assert_stopped(code: int, log: str, out: Path, signame: str, ranks: int,
                   steps: int = STEPS) -> str:
    """The stop's exit code and one line, no traceback, the stop's checkpoint complete and
    published; returns its tag."""
    assert code == STOPPED_EXIT, log[-4000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-4000:]
    line, = [line for line in log.splitlines() if line.startswith("mom-train: stopped: ")]
    step = int(line.split(" after step ")[1].split(":")[0])
    tag = f"step_{step:06d}"
    assert line == (f"mom-train: stopped: {signame} after step {step}: saved checkpoint "
                    f"{out / 'ckpt' / tag}. Continue with the same command plus --resume (or "
                    f"--resume auto).")
    assert 3 <= step < steps
    assert (out / "ckpt" / "latest").read_text() == tag
    names = {p.name for p in (out / "ckpt" / tag).iterdir()}
    assert {"manifest.json", "dense.pt"} | {f"run_state_rank{r}.pt" for r in range(ranks)} \
        <= names
    return tag


SLOW_MANIFEST = """
import sys, time
from mom_ds.train import checkpoint
write = checkpoint.write_manifest
def slow(tag_dir):
    print("writing the manifest", flush=True)
    time.sleep(60)
    write(tag_dir)
checkpoint.write_manifest = slow
from mom_ds.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_one_rank_stops_saved_and_resumes_like_an_uninterrupted_run(data, tmp_path):
    # A second SIGINT while the stop's checkpoint is written (its manifest held back from
    # outside): out at once, nothing published, no traceback.
    first = tmp_path / "first"
    run = Running([sys.executable, "-c", SLOW_MANIFEST, *args(data, first)], env(),
                  tmp_path / "first.err")
    run.wait_for("step 3/")
    run.proc.send_signal(signal.SIGINT)
    run.wait_for("writing the manifest")
    run.proc.send_signal(signal.SIGINT)
    code, log = run.finish(timeout=20)
    assert code == 130, log[-3000:]
    assert log.strip().splitlines()[-1] == ("mom-train: interrupted again: exiting at once "
                                            "without saving (the last published checkpoint "
                                            "is unchanged)")
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    unfinished, = (first / "ckpt").glob("step_*")
    assert not (first / "ckpt" / "latest").exists()
    assert not (unfinished / "manifest.json").exists()

    # --resume auto where no checkpoint was ever completed: a fresh start, the failed
    # attempt's files set aside; it runs to the end uninterrupted (the reference)
    proc = mom_train(*args(data, first), "--resume", "auto")
    moved, = (first / "previous").iterdir()
    assert f"starting fresh (the previous attempt's ckpt, tb, metrics.jsonl, config.yaml " \
        f"moved to {moved})" in proc.stdout
    assert (moved / "ckpt" / unfinished.name).is_dir() and (moved / "metrics.jsonl").is_file()
    reference = losses(first)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # SIGTERM: finish the step, save, exit 5 with one line
    out = tmp_path / "run"
    run = Running([sys.executable, "-m", "mom_ds.cli.train", *args(data, out)], env(),
                  tmp_path / "run.err")
    run.wait_for("step 3/")
    run.proc.send_signal(signal.SIGTERM)
    code, log = run.finish()
    tag = assert_stopped(code, log, out, "SIGTERM", ranks=1)

    # issue 25 item 1: `latest` lost; --resume auto (the Slurm script's start) resumes from
    # the complete checkpoint and deletes nothing
    (out / "ckpt" / "latest").unlink()
    proc = mom_train(*args(data, out), "--resume", "auto")
    assert f"resumed from step {int(tag[5:])} " in proc.stdout
    assert f"resuming from {out / 'ckpt' / tag}, the newest complete checkpoint" in proc.stderr
    assert (out / "ckpt" / tag / "manifest.json").is_file()
    resumed = losses(out)
    assert sorted(resumed) == sorted(reference)
    assert all(abs(resumed[s] - reference[s]) <= 1e-6 for s in reference), (resumed, reference)


def test_resume_auto_decides_from_the_files_and_never_deletes(tmp_path, monkeypatch, capsys):
    """Resume once a checkpoint was ever completed (a manifest or `latest`: the resume then
    picks the newest that verifies or refuses, deleting nothing); else a fresh start, what
    a failed first attempt left moved aside; --resume takes no other value."""
    from mom_ds.cli.train import parse_args, resume_or_start

    monkeypatch.setenv("RANK", "0")
    assert resume_or_start(tmp_path / "new") is False
    assert "starting fresh (nothing to set aside)" in capsys.readouterr().out

    failed = tmp_path / "failed"  # its first checkpoint was cut before its manifest
    (failed / "ckpt" / "step_000004").mkdir(parents=True)
    (failed / "metrics.jsonl").write_text('{"step": 1}\n')
    assert resume_or_start(failed) is False
    moved, = (failed / "previous").iterdir()
    assert sorted(p.name for p in moved.iterdir()) == ["ckpt", "metrics.jsonl"]
    assert sorted(p.name for p in failed.iterdir()) == ["previous"]

    for marker in ("step_000004/manifest.json", "latest"):  # complete once (maybe damaged)
        run = tmp_path / marker.replace("/", "_")
        (run / "ckpt" / marker).parent.mkdir(parents=True)
        (run / "ckpt" / marker).write_text("{}")
        (run / "metrics.jsonl").write_text("")
        assert resume_or_start(run) is True
        assert (run / "metrics.jsonl").is_file() and not (run / "previous").exists()

    assert parse_args(["--resume"])[0].resume is True
    assert parse_args(["--resume", "auto"])[0].resume == "auto"
    assert parse_args([])[0].resume is False
    with pytest.raises(SystemExit):
        parse_args(["--resume", "step_000004"])
    assert "argument --resume: 'step_000004': the only value is auto (a checkpoint is " \
        "chosen with --resume-from TAG)" in capsys.readouterr().err


def deepspeed_sh(data: Path, out: Path, *extra: str) -> list[str]:
    return [str(REPO / "launch" / "deepspeed.sh"), "--num_accelerators", "2", "--master_port",
            str(free_port()), "--", *args(data, out, steps=20), *extra]


def test_two_ranks_stop_when_the_launcher_gets_sigterm(data, tmp_path):
    """SIGTERM to launch/deepspeed.sh's pid: both ranks save one checkpoint and exit,
    nothing keeps running, and the resumed run equals an uninterrupted one."""
    if shutil.which("deepspeed", path=launch_env()["PATH"]) is None:
        pytest.skip("the deepspeed launcher is not installed")
    environ = launch_env(OMP_NUM_THREADS="1")
    reference_dir = tmp_path / "reference"
    proc = subprocess.run(deepspeed_sh(data, reference_dir), cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    out = tmp_path / "run"
    run = Running(deepspeed_sh(data, out), environ, tmp_path / "run.err")
    run.wait_for("step 3/")
    os.kill(run.proc.pid, signal.SIGTERM)
    code, log = run.finish()
    assert processes_with(str(out)) == [], log[-4000:]  # no rank, no launcher left behind
    assert_stopped(code, log, out, "SIGTERM", ranks=2, steps=20)
    assert "mom-launch: SIGTERM forwarded to 2 rank(s) on this node" in log

    proc = subprocess.run(deepspeed_sh(data, out, "--resume"), cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    reference, resumed = losses(reference_dir), losses(out)
    assert sorted(resumed) == sorted(reference) == list(range(1, 21))
    assert all(abs(resumed[s] - reference[s]) <= 1e-6 for s in reference), (resumed, reference)


def test_a_killed_rank_is_named_by_the_survivor_under_deepspeed_sh(data, tmp_path):
    """Issue 25, item 9: the deepspeed launcher SIGTERMs the survivor as soon as a rank
    dies; the survivor now goes on to its failed collective and names the lost rank."""
    if shutil.which("deepspeed", path=launch_env()["PATH"]) is None:
        pytest.skip("the deepspeed launcher is not installed")
    out = tmp_path / "run"
    run = Running(deepspeed_sh(data, out, "--train.max_steps", "400"),
                  launch_env(OMP_NUM_THREADS="1"), tmp_path / "run.err")
    run.wait_for("step 3/")
    rank1, = [int(line.split(":")[0]) for line in processes_with(str(out))
              if b"RANK=1" in Path(f"/proc/{line.split(':')[0]}/environ").read_bytes().split(b"\0")
              and " run --from env " in line]
    os.kill(rank1, signal.SIGKILL)
    code, log = run.finish()
    assert code != 0
    assert f"mom-train: error: lost rank 1 on {os.uname().nodename} during step " in log, \
        log[-4000:]
    assert "Traceback" not in log
    assert processes_with(str(out)) == []


def test_the_handlers_are_ours_only_while_training():
    """mom-train called in-process (bench/repro.py --quick) gives the process its handlers
    back: a worker forked later by mom-prep's pool must die on the pool's SIGTERM. (Left
    installed, the next in-process mom-prep hung the test suite.)"""
    import signal

    from mom_ds.train.stopping import REQUEST, SIGNALS

    before = {s: signal.getsignal(s) for s in SIGNALS}
    with REQUEST.installed():
        assert all(signal.getsignal(s) == REQUEST._handle for s in SIGNALS)
        signal.raise_signal(signal.SIGUSR1)
        assert REQUEST.signum == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in SIGNALS} == before
    assert REQUEST.signum == 0
