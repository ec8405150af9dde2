"""Bad launches fail fast with the fix named: hostfile typos, too few ranks, an
unreachable master, a missing launcher environment; submit.sh --dry-run; which processes
the launch scripts' signal forwarding treats as ranks."""
from __future__ import annotations

import json
import time

import pytest

from mom_ds_testing.launchers import REPO, run
from mom_ds.launch_utils import (LaunchError, check_allocation, format_hostfile,
                                 is_rank_command, main, parse_hostfile, world_size_pinned_by,
                                 train_run_config)

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_hostfile_round_trip_with_comments():
    text = "# two nodes\nnode1 slots=8   # gpus 0-7\n\nnode2\tslots=4\n"
    hosts = parse_hostfile(text)
    assert hosts == {"node1": 8, "node2": 4}
    assert parse_hostfile(format_hostfile(hosts)) == hosts


@pytest.mark.parametrize("text, says", [
    ("node1 slots 4\n", "line 1: 'node1 slots 4' is not 'HOST slots=N'"),
    ("node1 slot=4\n", "is not 'HOST slots=N'"),
    ("node1\n", "is not 'HOST slots=N'"),                 # missing slots
    ("node1 slots=4x\n", "is not 'HOST slots=N'"),        # DeepSpeed's regex accepts this
    ("node1 slots=0\n", "node1 has slots=0"),
    ("node1 slots=4\nnode2 slots=4\nnode1 slots=2\n", "line 3: host node1 is listed again "
                                                     "(first on line 1)"),
    ("# nothing\n\n", "lists no hosts"),
])
def test_hostfile_errors_name_the_line_and_the_fix(text, says):
    with pytest.raises(LaunchError, match="Fix:") as err:
        parse_hostfile(text)
    assert says in str(err.value)


def test_check_hostfile_cli(tmp_path, capsys):
    good = tmp_path / "hosts"
    good.write_text("localhost slots=2\n")
    assert main(["check-hostfile", str(good)]) == 0
    assert "1 host(s), 2 slot(s)" in capsys.readouterr().out
    assert main(["check-hostfile", str(good), "--need", "4"]) == 1
    assert "offers 2 slots but the run needs 4" in capsys.readouterr().err


def test_deepspeed_script_refuses_bad_hostfiles(tmp_path):
    # DeepSpeed #5221: a hostfile path that does not exist must not fall back to one node.
    missing = run(["launch/deepspeed.sh", "--hostfile", str(tmp_path / "hostfiel"), "--",
                   "--config", "configs/tiny.yaml"], timeout=60)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    typo = tmp_path / "typo"
    typo.write_text("localhost slots 2\n")
    bad = run(["launch/deepspeed.sh", "--hostfile", str(typo), "--", "--config",
               "configs/tiny.yaml"], timeout=60)
    assert bad.returncode != 0 and "is not 'HOST slots=N'" in bad.stderr


def test_allocation_check():
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1"}
    assert check_allocation({**slurm, "SLURM_NTASKS": "2"}, 2, "the submission") == 2
    with pytest.raises(LaunchError, match="has 1 task.*needs 2 ranks.*Fix:"):
        check_allocation(slurm, 2, "the submission")
    with pytest.raises(LaunchError, match="1 GPU.*for 2 tasks per node.*--gpus-per-node 2"):
        check_allocation({"SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "1"}, 2, "the submission")
    with pytest.raises(LaunchError, match="not inside a Slurm job"):
        check_allocation({}, 1, "the submission")


def test_world_size_pinned_by_deepspeed_json(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": 32}))
    args = ["--config", "configs/tiny.yaml", "--train.micro_batch_size", "4"]
    assert world_size_pinned_by(train_run_config([*args, "--deepspeed", str(ds_json)])) == 8
    assert world_size_pinned_by(train_run_config(args)) is None  # zero1.json: any size


def rank1_env(monkeypatch, master: str) -> None:
    for name, value in zip(RANK_VARS, ("1", "2", "1", master, "29500")):
        monkeypatch.setenv(name, value)


def test_unreachable_master_fails_within_the_timeout(monkeypatch, capsys):
    # 192.0.2.1 is TEST-NET-1: routed nowhere, so connections time out or are unreachable.
    rank1_env(monkeypatch, "192.0.2.1")
    monkeypatch.setattr("mom_ds.launch_utils.MASTER_TIMEOUT_S", 3.0)
    start = time.monotonic()
    assert main(["run", "--from", "env", "--", "mom-train"]) == 1
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert "rank 1: the master 192.0.2.1:29500 did not accept a connection within 3 s" in err
    assert "Fix:" in err


def test_unresolvable_master_fails_at_once(monkeypatch, capsys):
    rank1_env(monkeypatch, "no-such-host.invalid")
    assert main(["run", "--from", "env", "--", "mom-train"]) == 1
    assert "does not resolve" in capsys.readouterr().err


def test_run_without_launcher_environment_says_which_variables(monkeypatch, capsys):
    for name in RANK_VARS:
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "--from", "env", "--", "mom-train"]) == 1
    assert ", ".join(RANK_VARS) + " not set" in capsys.readouterr().err
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "--from", "slurm", "--", "mom-train"]) == 1
    assert "must run as an srun task" in capsys.readouterr().err


def test_submit_dry_run_prints_the_commands():
    result = run([str(REPO / "launch/slurm/submit.sh"), "--nodes", "2", "--gpus-per-node", "8",
                  "--time", "02:00:00", "--job-name", "mom-big", "--dry-run", "--",
                  "--config", "configs/tiny.yaml"], timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sbatch --job-name mom-big --nodes 2 --ntasks-per-node 8 "
                               "--time 02:00:00 --output runs/slurm/%x-%j.out")
    assert "--gpus-per-node 8" in lines[0] and "train.sbatch --config configs/tiny.yaml" \
        in lines[0]
    assert any(line.startswith("python -m mom_ds.launch_utils check-allocation --need 16")
               for line in lines)
    assert "srun --kill-on-bad-exit=1 python -u -m mom_ds.launch_utils run --from slurm -- " \
        "mom-train --config configs/tiny.yaml --resume auto " in lines
    # issue 25, item 1: never --overwrite (it deleted complete checkpoints on a requeue);
    # USR1 120 s before the time limit, and a requeue after the stop it causes
    assert "--overwrite" not in result.stdout
    assert "#SBATCH --signal=B:USR1@120" in lines and "#SBATCH --requeue" in lines
    assert "# after USR1 and exit code 5 (stopped, checkpoint saved): scontrol requeue <id>" \
        in lines


@pytest.mark.parametrize("args, rank", [
    (["/venv/bin/python3", "-u", "/repo/launch/rank.py", "run", "--from", "env", "--",
      "mom-train"], True),
    (["python", "-u", "-m", "mom_ds.launch_utils", "run", "--from", "mpi", "--", "mom-train"],
     True),
    # the deepspeed runner and deepspeed.launcher.launch name rank.py later on
    (["/venv/bin/python3", "/venv/bin/deepspeed", "--num_accelerators", "2",
      "--no_local_rank", "/repo/launch/rank.py", "run", "--from", "env"], False),
    (["/venv/bin/python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=",
      "--no_local_rank", "/repo/launch/rank.py", "run", "--from", "env"], False),
    (["python", "-m", "mom_ds.launch_utils", "supervise", "--", "deepspeed"], False),
    (["mpirun", "-np", "2", "python", "-u", "-m", "mom_ds.launch_utils", "run"], False),
])
def test_supervise_signals_only_the_ranks(args, rank):
    assert is_rank_command(args) is rank
