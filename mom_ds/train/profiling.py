"""train.profile_steps: torch.profiler around a few optimizer steps, one trace per rank in
<out_dir>/profile/ (TensorBoard's profiler plugin, Perfetto or chrome://tracing read it).
The routed blocks label their phases (route, permute, exchange, compute, combine) with
record_function, which costs nothing while no profiler runs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

PROFILE_DIR = "profile"


def trace_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / PROFILE_DIR


class StepProfiler:
    """Starts before optimizer step start+1 and writes the trace after step end."""

    def __init__(self, steps: list[int], out_dir: str | Path):
        self.start, self.end = steps if steps else (None, None)
        self.directory = trace_dir(out_dir)
        self.active: Optional[profile] = None

    def before_step(self, step: int) -> None:
        """step: optimizer steps done so far."""
        if step == self.start:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            rank = dist.get_rank() if dist.is_initialized() else 0
            self.active = profile(activities=activities, record_shapes=True,
                                  on_trace_ready=tensorboard_trace_handler(
                                      str(self.directory), worker_name=f"rank{rank}"))
            self.active.__enter__()

    def after_step(self, step: int) -> None:
        if self.active is not None and step == self.end:
            self.active.__exit__(None, None, None)  # writes the trace
            self.active = None
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"profiler trace of steps {self.start + 1}-{self.end} in {self.directory}/ "
                      f"(tensorboard --logdir {self.directory}, or open the .pt.trace.json in "
                      f"https://ui.perfetto.dev)", flush=True)
