"""The optional Weights & Biases sink (train.wandb_project): the scalars TensorBoard gets, at
the same steps, and the resolved config. W&B is an extra (`pip install 'mom-ds[wandb]'`);
`check()` runs in preflight, before anything expensive, so a missing package is one line.

The W&B run's id is kept in the run directory (wandb-run-id), so a resumed or requeued run
goes on in the same W&B run. W&B drops values logged at a step below its last one: the
steps a resume replays after its checkpoint keep their first values there (an exact
resume logs the same numbers again); TensorBoard and metrics.jsonl get the replay.
"""
from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..files import write_text

ID_FILE = "wandb-run-id"
LOCAL_DIR = "wandb"  # what wandb.init(dir=out_dir) writes there (offline runs to sync)


def check(project: str) -> None:
    if project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project is {project!r} but wandb is not installed. Fix: "
                         f"pip install 'mom-ds[wandb]' (or set train.wandb_project to \"\").")


def open_run(project: str, out_dir: Path, config: dict[str, Any]):
    """The W&B run of this run directory, started or continued."""
    import wandb

    id_path = out_dir / ID_FILE
    if id_path.is_file():
        run_id = id_path.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B ids: short, lowercase, alphanumeric
        write_text(id_path, run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", name=out_dir.name,
                      dir=str(out_dir), config=config)


class TeeWriter:
    """A SummaryWriter whose scalars are also kept, to go to W&B in one log call."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.scalars: dict[str, float] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)
        self.scalars[tag] = float(value)

    def __getattr__(self, name: str):  # images, histograms: TensorBoard only
        return getattr(self.writer, name)
