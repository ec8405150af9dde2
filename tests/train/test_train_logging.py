"""What a run logs beyond the loss (docs/training.md, "Logging"): step and data time, memory
as the maximum over ranks, the resolved config as text, a marker where a run resumed, and
mom-report's gradient-norm panel and resume lines."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mom_ds_testing.multirank import run_ranks
from mom_ds_testing.runs import metrics, mom_train, tiny_args, write_byte_data


def _read_step_on(rank: int, world: int, ckpt_dir: str) -> tuple[float, dict, float]:
    """A logging step's reading with this rank's peak memory set to rank + 1 GB and its
    loss to rank + 1: the memory logged is the largest, the loss the mean."""
    from mom_ds.config import TrainConfig
    from mom_ds.train import step_log
    from mom_ds.train.health import Health
    from mom_ds.model.routing import RoutingRecord

    step_log.memory_gb = lambda: float(rank + 1)
    health = Health(torch.device("cpu"), Path(ckpt_dir), TrainConfig())
    sums = {"loss": torch.tensor(2.0 * (rank + 1))}  # two micro-batches
    reading = step_log.read_step(sums, 2, RoutingRecord(), health, None, torch.nn.Linear(1, 1))
    return reading.memory_gb, reading.losses, reading.health[0]


def test_a_logging_step_reads_memory_as_the_largest_of_any_rank(tmp_path):
    results = run_ranks(_read_step_on, 2, str(tmp_path))
    for memory, losses, first_bad in results:
        assert memory == 2.0                  # rank 1's, on both ranks
        assert losses == {"loss": 1.5}        # mean of 1 and 2 over ranks
        assert first_bad == -1.0              # the health flags ride in the same transfer


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """8 steps, stopped at 4 and resumed, with the W&B sink in offline mode (no network)."""
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("logging")
    data = write_byte_data(root / "data")
    out = root / "run"
    args = tiny_args(data, out, "--train.max_steps", "8", "--train.ckpt_interval", "4",
                     "--train.wandb_project", "mom-ds-test")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    try:
        mom_train(*args, "--stop-after", "4")
        mom_train(*args, "--resume")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    return out


def _chunks(data: bytes) -> Iterator[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then
    LevelDB's log format: 32 KiB blocks of chunks, each a 4-byte checksum, a 2-byte length
    and a type (1 whole record; 2, 3, 4 its first, middle and last part)."""
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind in (2, 3):
            parts = (b"" if kind == 2 else parts) + chunk
        elif kind == 4:
            yield parts + chunk


def wandb_history(run: Path) -> tuple[set[str], dict[int, dict[str, float]]]:
    """(W&B run ids, step -> the scalars logged at that step) from the offline run files."""
    from wandb.proto import wandb_internal_pb2 as pb

    ids, rows = set(), {}
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        for chunk in _chunks(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(chunk)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                rows.setdefault(int(items["_step"]), {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
    return ids, rows


def scalars(run: Path) -> tuple[EventAccumulator, dict[str, dict[int, float]]]:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    return acc, {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_step_time_data_time_memory_and_the_module_counts_are_logged(resumed_run):
    rows = metrics(resumed_run)
    for step in range(1, 9):
        row = rows[step]
        assert 0 < row["perf/data_time_s"] < row["perf/step_time_s"], (step, row)
        # tokens/s is the same window's tokens over its time: step time is its inverse
        tokens = row["train/tokens_seen"] / step
        assert row["perf/tokens_per_s"] * row["perf/step_time_s"] == pytest.approx(tokens)
        assert row["perf/memory_gb"] > 0
    _, tb = scalars(resumed_run)
    config = yaml.safe_load((resumed_run / "config.yaml").read_text())["model"]
    for half, pool in (("attn", config["n_attn_modules"]), ("ffn", config["n_ffn_modules"])):
        per_module = [tb[f"routing/block0/{half}_tokens_module{j}"][8] for j in range(pool)]
        dead = tb[f"routing/block0/{half}_dead_modules"][8]
        assert dead == sum(n == 0 for n in per_module)
        assert f"routing/block0/{half}_tokens_module{pool}" not in tb  # SKIP is no module


def test_the_config_is_logged_as_text_and_the_resume_is_marked(resumed_run):
    acc, tb = scalars(resumed_run)
    assert tb["run/resumed"] == {4: 1.0}  # the fresh start is no resume
    texts = acc.Tensors("run/config/text_summary")  # add_text's tag
    assert sorted(e.step for e in texts) == [0, 4]
    logged = texts[-1].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(logged.strip("`").removeprefix("yaml\n")) == \
        yaml.safe_load((resumed_run / "config.yaml").read_text())


def test_report_draws_the_gradient_norm_and_the_resume(resumed_run, tmp_path):
    pytest.importorskip("matplotlib")
    from mom_ds.cli import report

    run = report.load_events(resumed_run)
    assert "gradient norm" in report.panel_titles(run)
    assert all(math.isfinite(v) and v > 0 for v in run.scalars["train/grad_norm"][1])
    fig = report.render(run, "t")
    panel = next(ax for ax in fig.axes if ax.get_title() == "gradient norm")
    resume_lines = [line for line in panel.lines if line.get_label() == "resumed"]
    assert len(resume_lines) == 1 and list(resume_lines[0].get_xdata()) == [4, 4]


def test_wandb_gets_the_tensorboard_scalars_in_one_run_across_the_resume(resumed_run):
    ids, history = wandb_history(resumed_run)
    assert ids == {(resumed_run / "wandb-run-id").read_text().strip()}  # one run, resumed
    _, tb = scalars(resumed_run)
    assert sorted(history) == list(range(1, 9))
    for tag, points in tb.items():
        if tag == "run/resumed":  # a TensorBoard marker, not a logged value
            continue
        for step, value in points.items():
            assert history[step][tag] == pytest.approx(value, rel=1e-6), (tag, step)


def test_a_missing_wandb_is_one_error_before_anything_starts(monkeypatch):
    import importlib.util

    from mom_ds.config import ConfigError
    from mom_ds.train import wandb_sink

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    wandb_sink.check("")  # off: nothing to import
    with pytest.raises(ConfigError, match=r"pip install 'mom-ds\[wandb\]'"):
        wandb_sink.check("my-project")
