"""Stopping on request: SIGTERM, SIGUSR1 or SIGINT (preemption, a scheduler's time limit,
scancel, Ctrl-C) make every rank finish its optimizer step, agree on the step to stop at,
save a complete checkpoint there and exit with mom_ds.errors.STOPPED (5). A second SIGINT exits at once
without saving: checkpoint.save publishes `latest` only after a complete manifest, so a
hard exit mid-save leaves the previous checkpoint published and the half-written tag unused.

The handler only records the signal; the training loop asks `StopAgreement.should_stop()`
at every step boundary."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..errors import INTERRUPTED, STOPPED

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(Exception):
    """Raised on every rank once the stop checkpoint is saved and rank 0 printed its line;
    mom-train exits 5: resume it (Slurm's script requeues)."""
    exit_code = STOPPED
    report = False  # printed already, before the ranks exit (StopAgreement.stop)


class StopRequest:
    """This process's stop flag. Set only by the signal handler (a flag is all a handler can
    safely do while the main thread may be inside a collective or a checkpoint write)."""

    def __init__(self) -> None:
        self.signum = 0  # the first signal received; 0 = none
        self.interrupts = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handler for SIGNALS while the block runs; then the previous handlers again
        and a clear flag, so a process that goes on (mom-train called in-process, as
        bench/repro.py --quick does) does not keep catching SIGTERM: a worker it forks
        later (mom-prep's pool) would ignore the pool's own SIGTERM and hang it. A stop
        that was saved leaves SIG_IGN in place (StopAgreement.stop): the process exits."""
        previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
        for signum in SIGNALS:
            signal.signal(signum, self._handle)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                if signal.getsignal(signum) == self._handle:
                    signal.signal(signum, handler)
            self.signum, self.interrupts = 0, 0

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # the user insists: out now, `latest` stays as it was
                os.write(2, b"mom-train: interrupted again: exiting at once without saving "
                            b"(the last published checkpoint is unchanged)\n")
                os._exit(INTERRUPTED)  # nothing saved
        self.signum = self.signum or signum


REQUEST = StopRequest()  # installed by mom-train's main; never set in library use


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopAgreement:
    """Every rank must stop at the same step, or the ones that go on would wait in their
    next collective for the ones saving. The flag is agreed with an all_reduce(MAX) of this
    rank's signal number on a gloo group: on an NCCL cluster that is a host-side CPU tensor,
    so no GPU work is synchronised for it. The reduce is issued without waiting at step
    boundary s and waited at boundary s + 1 - by then it finished long ago - so the check
    costs no stall, and since every rank reads the same reduced value at the same boundary
    all stop together (one step after the signal). One rank needs no collective."""

    def __init__(self, request: StopRequest, timeout: timedelta):
        self.request = request
        self.group = (dist.new_group(backend="gloo", timeout=timeout)
                      if dist.get_world_size() > 1 else None)
        self.pending: Optional[tuple[dist.Work, torch.Tensor]] = None
        self.signum = 0  # the agreed signal once should_stop() said True

    def should_stop(self) -> bool:
        """Called by every rank at every step boundary."""
        if self.group is None:
            self.signum = self.request.signum
            return bool(self.signum)
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            self.pending = None
            self.signum = int(flag.item())
            if self.signum:
                return True
        flag = torch.tensor([self.request.signum], dtype=torch.int64)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group,
                                        async_op=True), flag)
        return False

    def close(self) -> None:
        """Wait for the last reduce (every rank issued it, so it completes)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None

    def stop(self, step: int, tag: str, ckpt_dir, monitor) -> Stopped:
        """After the stop checkpoint: rank 0 flushes its logs and prints the one line, then
        every rank waits for it before raising the returned Stopped. A launcher may kill the
        other ranks as soon as one exits with a non-zero code (deepspeed's, srun
        --kill-on-bad-exit), so nothing of rank 0's may still be pending by then."""
        # Saved: from now on a stop signal is ignored, at the C level, so that it cannot
        # kill the exit either (Python restores the default action while it shuts down);
        # srun --kill-on-bad-exit SIGTERMs the ranks still exiting when the first exits 5.
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        own = self.request.signum == self.signum
        by = signal_name(self.signum) + ("" if own else " (received by another rank)")
        message = (f"{by} after step {step}: saved checkpoint {ckpt_dir / tag}. Continue with "
                   f"the same command plus --resume (or --resume auto).")
        monitor.close()
        if dist.get_rank() == 0:
            print(f"mom-train: stopped: {message}", file=sys.stderr, flush=True)
        if self.group is not None:
            dist.barrier(group=self.group)
        return Stopped(message)
