"""A diverging run stops before it writes a checkpoint: the loss is watched on the device
(no host sync per step) and looked at where the loop syncs anyway (logging, evaluation,
saving); or, under train.nan_policy skip, its non-finite steps are skipped until too many
come in a row."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


class DivergenceError(RuntimeError):
    """The loss, the gradient norm or the weights stopped being finite."""


def last_good_checkpoint(ckpt_dir: Path) -> str:
    latest = ckpt_dir / "latest"
    if latest.is_file():
        return (f"the last good checkpoint is {ckpt_dir / latest.read_text().strip()} "
                f"(published in {latest})")
    return "no checkpoint was published before it"


def stop(what: str, step: int, ckpt_dir: Path) -> DivergenceError:
    return DivergenceError(
        f"{what} at step {step}: the run stopped without writing a checkpoint; "
        f"{last_good_checkpoint(ckpt_dir)}. Fix: lower train.lr or lengthen "
        f"train.warmup_steps (or clip harder with train.grad_clip), then --resume from the "
        f"last good checkpoint or start again.")


class Health:
    """What train.nan_policy asks for. stop: the first non-finite loss (kept on the device)
    or gradient norm ends the run at the next check. skip: DeepSpeed has already skipped
    each such step (it syncs the host for its overflow check anyway, so whether a step was
    applied is a host bool); the run ends once `max_skipped` steps in a row were skipped."""

    def __init__(self, device: torch.device, ckpt_dir: Path, policy: str, max_skipped: int):
        self.ckpt_dir = ckpt_dir
        self.skip = policy == "skip"
        self.max_skipped = max_skipped
        # first step whose loss was not finite on this rank (-1: none); device-side
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped_in_a_row = 0
        self.longest_skip_run = 0

    def record(self, step: int, loss: torch.Tensor) -> None:
        """After each micro-batch; an in-place device op, no sync."""
        if not self.skip:  # under skip, a non-finite loss is a skipped step, seen in stepped()
            self.first_bad.masked_fill_((self.first_bad < 0) & ~torch.isfinite(loss.detach()), step)

    def stepped(self, applied: bool) -> None:
        """After each optimizer step, with the engine's `was_step_applied()`."""
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1
        self.longest_skip_run = max(self.longest_skip_run, self.skipped_in_a_row)

    def check(self, step: int, grad_norm: Optional[float]) -> None:
        """Collective (every rank at the same step): raise if the policy says the run ends."""
        # -1 (none) is below every step, so MAX keeps a bad step; the skip run is a count
        seen = torch.stack([self.first_bad, torch.tensor(self.longest_skip_run,
                                                          device=self.first_bad.device)])
        if dist.is_initialized():
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        bad, skip_run = seen.tolist()
        if bad >= 0:
            raise stop("the training loss is not finite", bad, self.ckpt_dir)
        if self.skip:
            if skip_run >= self.max_skipped:
                raise stop(f"{skip_run} steps in a row had a non-finite loss or gradient and were "
                           f"skipped (train.max_skipped_steps = {self.max_skipped})", step,
                           self.ckpt_dir)
        elif grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise stop(f"the gradient norm is {float(grad_norm)}", step, self.ckpt_dir)
