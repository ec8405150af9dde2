"""What a run reports: console lines, `metrics.jsonl`, `routing.jsonl` and TensorBoard, all
on rank 0.

DeepSpeed's own TensorBoard monitor writes only the learning rate, so the scalars and the
routing histograms are ours (one SummaryWriter under `<out_dir>/tb`). The routing record
(model/routing.py) is summed over micro-batches and ranks before it is written, so it
describes the global batch; its values go to TensorBoard (the dashboard) and, as one JSON
row per logged step, to `routing.jsonl`, which mom-report reads.
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml

from ..files import json_rows, write_text
from ..model.routing import RoutingRecord
from . import wandb_sink
from .routing_dashboard import log_routing

# Dense bf16 peak TFLOP/s per device (vendor data sheets, SXM parts, no sparsity).
# nanoGPT hard-codes A100's 312 and reports 104% MFU on an H100 (nanoGPT #182): look it up.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0,
                   "L4": 121.0, "V100": 125.0, "4090": 165.0, "3090": 71.0}
# CPUs have no single honest number; 1 TFLOP/s is a placeholder (set train.peak_tflops).
CPU_PEAK_TFLOPS = 1.0


def device_peak_tflops(configured: float) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where it came from)."""
    if configured > 0:
        return configured, "train.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak, f"detected {name}"
        print(f"warning: unknown GPU {name!r}; MFU uses {CPU_PEAK_TFLOPS} TFLOP/s. Set "
              f"train.peak_tflops.", file=sys.stderr)
    return CPU_PEAK_TFLOPS, "CPU placeholder (set train.peak_tflops)"


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set now (0 where /proc is missing)."""
    return (_status_kib("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set: /proc's VmHWM, which starts afresh at exec (and at
    reset_peak_rss). ru_maxrss, the fallback, starts at the parent's peak after fork + exec
    on Linux, so a child of a large process reports its parent's size."""
    hwm = _status_kib("VmHWM")
    return (hwm if hwm is not None
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> None:
    """Set the peak resident set to the current one (Linux >= 4.0), to measure one phase."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_gb() -> float:
    """Peak memory of this process: CUDA allocations on GPU, resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return peak_rss_bytes() / 2 ** 30


ROUTING_FILE = "routing.jsonl"  # one RoutingRecord.as_row() per logged step; mom-report


class Monitor:
    def __init__(self, out_dir: str | Path, enabled: bool, resumed_step: int = 0,
                 wandb_project: str = ""):
        """resumed_step: a resumed run replays the steps after its checkpoint, so what was
        logged after that step is dropped (metrics.jsonl rewritten atomically, TensorBoard's
        purge_step) and every step appears once. wandb_project: also log to W&B
        (wandb_sink.py), from `started` on."""
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.wandb_project = wandb_project
        self.wandb = None
        self.writer = None
        self.metrics = None
        self.metrics_path = Path(out_dir) / "metrics.jsonl"
        self.routing_path = Path(out_dir) / ROUTING_FILE
        self.routing_rows = None
        self.tb_dir = Path(out_dir) / "tb"
        self._open(resumed_step)

    def rewind(self, step: int) -> None:
        """Training went back to `step` (train.spike_policy skip): what was logged after it
        is dropped, as on a resume."""
        self.close()
        self._open(step)

    def _open(self, resumed_step: int) -> None:
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            for path in (self.metrics_path, self.routing_path):
                if resumed_step and path.is_file():
                    with self._writing(path):
                        _keep_rows_up_to(path, resumed_step)
            _silence_event_writer_threads()
            with self._writing(self.tb_dir):
                self.writer = SummaryWriter(str(self.tb_dir),
                                            purge_step=resumed_step + 1 if resumed_step else None)
            with self._writing(self.metrics_path):
                self.metrics = open(self.metrics_path, "a")
            with self._writing(self.routing_path):
                self.routing_rows = open(self.routing_path, "a")

    @staticmethod
    @contextlib.contextmanager
    def _writing(path: Path) -> Iterator[None]:
        """A failed write (a full disk, a quota) as one line naming the file: the OSError of a
        buffered file or of TensorBoard's writer thread names no path."""
        try:
            yield
        except OSError as err:
            raise OSError(f"cannot write {path}: {err.strerror or err}. Fix: free space (or "
                          f"raise the quota) on that file system, then mom-train --resume; the "
                          f"last published checkpoint is intact.") from None

    def started(self, step: int, config: dict[str, Any]) -> None:
        """At every start: the resolved config as text (TensorBoard's text tab), and on a
        resume a marker, run/resumed = 1 at the step the run went on from (mom-report draws
        it). TensorBoard only: metrics.jsonl keeps one row per logged step."""
        if not self.enabled:
            return
        if self.wandb_project and self.wandb is None:
            self.wandb = wandb_sink.open_run(self.wandb_project, self.out_dir, config)
        text = "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```"
        with self._writing(self.tb_dir):
            self.writer.add_text("run/config", text, step)
            if step:
                self.writer.add_scalar("run/resumed", 1.0, step)
            self.writer.flush()

    def scalars(self, step: int, values: dict[str, float], echo: Optional[str] = None) -> None:
        if not self.enabled:
            return
        with self._writing(self.tb_dir):
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()  # a write error surfaces at this step, not at some later one
        with self._writing(self.metrics_path):
            self.metrics.write(json.dumps({"step": step, **values}) + "\n")
            self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if echo:
            print(echo, flush=True)

    def routing(self, step: int, record: RoutingRecord) -> None:
        """The routing record of the global batch: the dashboard (routing_dashboard.py) and
        one row of routing.jsonl (RoutingRecord.as_row). A record that routed nothing (the
        modular student's) writes nothing."""
        if not self.enabled or not (record.blocks or record.mod_selected.numel()
                                    or record.comm is not None):
            return
        writer = wandb_sink.TeeWriter(self.writer)
        with self._writing(self.tb_dir):
            log_routing(writer, step, record)
        with self._writing(self.routing_path):
            self.routing_rows.write(json.dumps(record.as_row(step)) + "\n")
            self.routing_rows.flush()
        if self.wandb is not None:
            self.wandb.log(writer.scalars, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.enabled:
            with self._writing(self.tb_dir):
                self.writer.close()
            with self._writing(self.metrics_path):
                self.metrics.close()
            with self._writing(self.routing_path):
                self.routing_rows.close()


def _keep_rows_up_to(path: Path, step: int) -> None:
    """metrics.jsonl (or routing.jsonl) without the rows after `step`, rewritten atomically.
    A line that is not JSON (cut short when the disk filled) is dropped with a warning
    naming it."""
    keep = [line for line, row in json_rows(path) if row["step"] <= step]
    write_text(path, "".join(line + "\n" for line in keep))


def _silence_event_writer_threads() -> None:
    """TensorBoard writes events from a thread that, on an error, prints its traceback and
    keeps the exception, which the writer raises again at the next write or flush in the
    main thread (where Monitor names the path). Only that thread's printout is dropped."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "mom_ds_event_writer", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)

    hook.mom_ds_event_writer = True  # type: ignore[attr-defined]
    threading.excepthook = hook
