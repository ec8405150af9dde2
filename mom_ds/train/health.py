"""A diverging run stops before it writes a checkpoint: the loss is watched on the device
(no host sync per step) and looked at where the loop syncs anyway (logging, evaluation,
saving)."""
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
    def __init__(self, device: torch.device, ckpt_dir: Path):
        self.ckpt_dir = ckpt_dir
        # first step whose loss was not finite on this rank (-1: none); device-side
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, step: int, loss: torch.Tensor) -> None:
        """After each micro-batch; an in-place device op, no sync."""
        self.first_bad.masked_fill_((self.first_bad < 0) & ~torch.isfinite(loss.detach()), step)

    def check(self, step: int, grad_norm: Optional[float]) -> None:
        """Collective (every rank at the same step): raise if any rank saw a non-finite loss
        since the start, or the gradient norm of the last step is not finite."""
        seen = self.first_bad.clone()  # -1 (none) is below every step: MAX keeps a step
        if dist.is_initialized():
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        bad = int(seen)
        if bad >= 0:
            raise stop("the training loss is not finite", bad, self.ckpt_dir)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise stop(f"the gradient norm is {float(grad_norm)}", step, self.ckpt_dir)
