"""Every failure is one line (issue 25, items 8 and 9): a disk that fills during a checkpoint
save or between saves, a metrics.jsonl cut short, a crafted pickle in a checkpoint, a
DeepSpeed JSON or YAML recipe DeepSpeed or YAML would misread, and a free-space message
whose numbers differ. Each names the file and the fix, exits 2 and prints no traceback."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mom_ds.config import ConfigError, load_deepspeed_json, load_run_config
from mom_ds_testing.runs import REPO, TINY, metrics, run_python, tiny_args, write_byte_data

# a file-size limit stands in for a full disk: writes past it fail (EFBIG) the way writes to
# a full file system fail (ENOSPC), inside torch.save's C++ writer and TensorBoard's thread
LIMIT_FILES = """
import resource, signal
def fill_the_disk(limit):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
"""

FULL_DURING_SECOND_SAVE = LIMIT_FILES + """
import sys
import mom_ds.train.checkpoint as checkpoint
real_save, saves = checkpoint.save, []
def save(*args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
        fill_the_disk(2 ** 20)  # below dense.pt (4 MB), above every other file
    return real_save(*args, **kwargs)
checkpoint.save = save
from mom_ds.cli.train import main
sys.exit(main(sys.argv[1:]))
"""

MONITOR_UNTIL_FULL = LIMIT_FILES + """
import sys
from mom_ds.errors import run_command
from mom_ds.train.monitor import Monitor
out, limit, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def body():
    monitor = Monitor(out, True)
    fill_the_disk(limit)
    for step in range(1, 1000):
        monitor.scalars(step, {f"name{i}": 0.5 for i in range(names)})
    return 0
sys.exit(run_command("mom-train", body))
"""


def one_line_error(proc, *parts: str) -> None:
    """Exit 2, one `mom-train: error:` line holding every part, no traceback."""
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert all(part in errors[0] for part in parts), errors[0]
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr, \
        proc.stderr[-3000:]


@pytest.mark.slow
def test_a_disk_filling_mid_save_then_a_cut_metrics_line(tmp_path):
    data = write_byte_data(tmp_path / "data")
    out = tmp_path / "run"
    script = tmp_path / "full.py"
    script.write_text(FULL_DURING_SECOND_SAVE)
    proc = run_python([str(script), *tiny_args(data, out)])
    dense = out / "ckpt" / "step_000008" / "dense.pt"
    one_line_error(proc, f"cannot write {dense}", "are free on its file system", "Fix:")
    assert not dense.with_name("dense.pt.tmp").exists()  # the partial file is removed
    assert (out / "ckpt" / "latest").read_text() == "step_000004"
    # what a full disk leaves behind in the log: its last row cut short
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 3.9')
    rows = (out / "metrics.jsonl").read_text().splitlines()
    proc = run_python(["-m", "mom_ds.cli.train", *tiny_args(data, out), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: {out / 'metrics.jsonl'} line {len(rows)} is not a complete JSON row" \
        in proc.stderr and "Traceback" not in proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, 13)) and sorted(metrics(out)) == list(range(1, 13))
    assert (out / "ckpt" / "latest").read_text() == "step_000012"


def test_a_disk_filling_between_saves_names_the_log_file(tmp_path):
    script = tmp_path / "monitor.py"
    script.write_text(MONITOR_UNTIL_FULL)
    # 20 scalars a step: TensorBoard's event file reaches the limit first
    proc = run_python([str(script), str(tmp_path / "a"), "4000", "20"])
    one_line_error(proc, f"cannot write {tmp_path / 'a' / 'tb'}", "Fix: free space")
    # metrics.jsonl nearly at the limit already: it is the one that fails
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text(json.dumps({"step": 0, "x": "." * 3900}) + "\n")
    proc = run_python([str(script), str(tmp_path / "b"), "4000", "1"])
    one_line_error(proc, f"cannot write {tmp_path / 'b' / 'metrics.jsonl'}", "Fix: free space")


def test_a_cut_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path, capsys):
    from mom_ds.train.monitor import Monitor

    log = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 4.0 - s / 10}) for s in range(1, 7)]
    log.write_text("\n".join(rows) + '\n{"step": 7, "lo')
    Monitor(tmp_path, True, resumed_step=4).close()
    assert log.read_text() == "".join(r + "\n" for r in rows[:4])
    assert f"warning: {log} line 7 is not a complete JSON row" in capsys.readouterr().err


class Planted:
    """Unpickling this runs code: what a crafted checkpoint could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_in_a_checkpoint_is_refused_without_the_unsafe_advice(tmp_path):
    import torch

    from mom_ds.checkpoints.format import CheckpointError, load_file

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "dense.pt"
    torch.save({"client": {"step": 1}, "params": Planted(marker)}, crafted)
    with pytest.raises(CheckpointError) as err:
        load_file(crafted)
    message = str(err.value)
    assert f"{crafted} is not a tensors-only checkpoint" in message and "Fix:" in message
    assert "weights_only" not in message and "\n" not in message and not marker.exists()


def test_a_free_space_message_shows_the_difference(tmp_path, monkeypatch):
    import shutil

    import torch.distributed as dist

    from mom_ds.checkpoints.format import CheckpointError, size_text
    from mom_ds.train import checkpoint

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4_300_000))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor)
    with pytest.raises(CheckpointError) as err:
        checkpoint.check_space(tmp_path, 4_000_000, step=8)
    assert "it needs about 3.81 MB plus a 10% margin (4.20 MB), 4.10 MB are free" in \
        str(err.value)
    assert size_text(5_000) == "5,000 bytes"
    assert size_text(3 * 2 ** 30) == "3.00 GB"


DS_REFUSED = [
    ([{"stage": 2}], "holds a JSON list, not an object"),
    ({"zero_optimisation": {"stage": 2}},
     "DeepSpeed reads no key 'zero_optimisation', so it would be ignored. Fix: did you mean "
     "'zero_optimization'?"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage: Input should be 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}},
     "zero_optimization.overlap_com: Extra inputs are not permitted (got true). Fix: did you "
     "mean 'overlap_comm'?"),
    ({"bf16": True}, "bf16 must be an object of settings {...}, not true"),
    ({"zero_optimization": "2"}, "zero_optimization must be an object of settings {...}, not "
                                 '"2"'),
    ('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 3}}',
     "gives the key 'zero_optimization' twice"),
]


@pytest.mark.parametrize("ds_json, message", DS_REFUSED)
def test_a_deepspeed_json_deepspeed_would_misread_is_refused(tmp_path, ds_json, message):
    from mom_ds.train.engine import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(ds_json if isinstance(ds_json, str) else json.dumps(ds_json))
    run = load_run_config(TINY, ["--parallel.deepspeed", str(path)])
    with pytest.raises(ConfigError) as err:
        build_ds_config(run, load_deepspeed_json(path), world_size=1, device="cpu")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_every_shipped_deepspeed_json_passes_and_mom_train_names_a_bad_one(tmp_path):
    from mom_ds.train.engine import build_ds_config

    for path in sorted((REPO / "ds_configs").glob("*.json")):
        run = load_run_config(TINY, ["--parallel.deepspeed", str(path)])
        build_ds_config(run, load_deepspeed_json(path), world_size=2, device="cpu")
    bad = tmp_path / "zero4.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    data = write_byte_data(tmp_path / "data")
    proc = run_python(["-m", "mom_ds.cli.train", *tiny_args(data, tmp_path / "run"),
                       "--parallel.deepspeed", str(bad)])
    one_line_error(proc, f"DeepSpeed config {bad}: zero_optimization.stage")


def test_a_yaml_recipe_with_a_key_twice_or_a_tab_is_one_line(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 3.0e-4\n  max_steps: 10\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(twice)
    assert str(err.value).startswith(f"{twice}:4: key 'lr' is given twice in one mapping "
                                     f"(line 2 column 3, line 4 column 3)")
    tab = tmp_path / "tab.yaml"
    tab.write_text("train:\n  lr: 3.0e-4\n\tmax_steps: 10\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(tab)
    assert str(err.value) == (f"{tab}:3:1: found character '\\t' that cannot start any token. "
                              f"Fix: indent with spaces, never tabs.")
    # merge keys may still be overridden: that is not a duplicate
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {lr: 3.0e-4, max_steps: 10}\ntrain: {<<: *b, lr: 1.0e-3}\n")
    from mom_ds.strict_yaml import read_yaml

    assert read_yaml(merged)["train"] == {"lr": 1.0e-3, "max_steps": 10}
