"""A diverging run stops before it writes a checkpoint: the loss is watched on the device
(no host sync per step) and looked at where the loop syncs anyway (logging, evaluation,
saving); or, under train.nan_policy skip, its non-finite steps are skipped until too many
come in a row. A loss that stays finite but explodes (train.spike_*) is watched the same
way, against its running mean."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import DIVERGED
from ..checkpoints.published import last_good_checkpoint

# The running mean reaches back about this many optimizer steps (an EMA whose weight is
# 1/n for the first n steps: their plain mean, then 1/SPIKE_HORIZON).
SPIKE_HORIZON = 100
# A spike must also rise this many nats above the mean: near zero loss (memorised data) a
# ratio alone would call noise a spike.
SPIKE_MIN_RISE = 1.0


class DivergenceError(RuntimeError):
    """The loss, the gradient norm or the weights stopped being finite."""
    exit_code = DIVERGED


def stopped(what: str, step: int, ckpt_dir: Path, fix: str = "") -> str:
    """The message of a run that stops at `step` because of `what`."""
    return (f"{what} at step {step}: the run stopped without writing a checkpoint; "
            f"{last_good_checkpoint(ckpt_dir)}. Fix: lower train.lr or lengthen "
            f"train.warmup_steps (or clip harder with train.grad_clip), then --resume from "
            f"the last good checkpoint or start again{fix}.")


def stop(what: str, step: int, ckpt_dir: Path) -> DivergenceError:
    return DivergenceError(stopped(what, step, ckpt_dir))


class SpikeError(DivergenceError):
    """The loss stayed finite but rose far above its running mean (train.spike_*)."""

    def __init__(self, what: str, step: int, ckpt_dir: Path):
        super().__init__(stopped(what, step, ckpt_dir, "; if such a rise is expected (new "
                                 "data), raise train.spike_factor or set train.spike_policy off"))
        self.what, self.step = what, step  # step: the first step of the spike


class Health:
    """What train.nan_policy and train.spike_policy ask for. nan stop: the first non-finite
    loss (kept on the device) or gradient norm ends the run at the next check. nan skip:
    DeepSpeed has already skipped each such step (it syncs the host for its overflow check
    anyway, so whether a step was applied is a host bool); the run ends once `max_skipped`
    steps in a row were skipped. Spikes: each optimizer step's loss is compared, on the
    device, with the running mean of the steps before it; spike_steps steps in a row above
    spike_factor x that mean raise SpikeError at the next check (the loop then stops or,
    under skip, goes back to the last good checkpoint). The mean is part of the run's state:
    state_dict() goes into every checkpoint, so a resumed run is judged against its history."""

    def __init__(self, device: torch.device, ckpt_dir: Path, t: TrainConfig,
                 state: Optional[dict[str, Any]] = None):
        self.ckpt_dir = ckpt_dir
        self.skip = t.nan_policy == "skip"
        self.max_skipped = t.max_skipped_steps
        # first step whose loss was not finite on this rank (-1: none); device-side
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped_in_a_row = 0
        self.longest_skip_run = 0
        self.watch_spikes = t.spike_policy != "off"
        self.spike_factor, self.spike_steps = t.spike_factor, t.spike_steps
        state = state or {}
        # the running mean and how many steps it holds (the EMA's warm-up), device-side
        self.mean = torch.tensor(float(state.get("loss_mean", 0.0)), dtype=torch.float64,
                                 device=device)
        self.mean_steps = torch.tensor(float(state.get("loss_mean_steps", 0)),
                                       dtype=torch.float64, device=device)
        self.spike_run = torch.zeros((), dtype=torch.float64, device=device)
        # first step of the first spike of spike_steps steps (-1: none), and its loss then
        self.spike_start = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.spike_loss = torch.zeros((), dtype=torch.float64, device=device)

    def record(self, step: int, loss: torch.Tensor) -> None:
        """After each micro-batch; an in-place device op, no sync."""
        if not self.skip:  # under skip, a non-finite loss is a skipped step, seen in stepped()
            self.first_bad.masked_fill_((self.first_bad < 0) & ~torch.isfinite(loss.detach()), step)

    def step_loss(self, step: int, loss: torch.Tensor) -> None:
        """After optimizer step `step` (1-based), its mean training loss on this rank: device
        ops only. A non-finite loss is nan_policy's business, neither a spike nor averaged."""
        if not self.watch_spikes:
            return
        loss = loss.detach().to(torch.float64)
        finite = torch.isfinite(loss)
        above = finite & (self.mean_steps > 0) & (loss > self.spike_factor * self.mean) \
            & (loss > self.mean + SPIKE_MIN_RISE)
        self.spike_run = torch.where(above, self.spike_run + 1, 0.0)
        new = (self.spike_start < 0) & (self.spike_run >= self.spike_steps)
        self.spike_start = torch.where(new, float(step - self.spike_steps + 1), self.spike_start)
        self.spike_loss = torch.where(new, loss, self.spike_loss)
        keep = finite & ~above  # spikes stay out of the mean they are judged against
        weight = 1.0 / torch.clamp(self.mean_steps + 1, max=SPIKE_HORIZON)
        self.mean = torch.where(keep, self.mean + weight * (loss - self.mean), self.mean)
        self.mean_steps = self.mean_steps + keep.to(torch.float64)

    def stepped(self, applied: bool) -> None:
        """After each optimizer step, with the engine's `was_step_applied()`."""
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1
        self.longest_skip_run = max(self.longest_skip_run, self.skipped_in_a_row)

    def state_dict(self) -> dict[str, Any]:
        """The running mean, for a checkpoint (read at a save: a host sync the loop makes)."""
        mean, steps = torch.stack([self.mean, self.mean_steps]).tolist()
        return {"loss_mean": mean, "loss_mean_steps": int(steps)}

    def reduced(self, *extra: torch.Tensor) -> torch.Tensor:
        """Collective (every rank at the same step): what `judge` reads, as the maximum over
        ranks, on the device (no host sync); `extra` scalars ride along in the same
        all-reduce (a logging step's peak memory)."""
        # -1 (none) is below every step, so MAX keeps a bad step; the skip run is a count
        device = self.first_bad.device
        seen = torch.stack([self.first_bad.to(torch.float64),
                            torch.tensor(float(self.longest_skip_run), dtype=torch.float64,
                                         device=device),
                            self.spike_start, self.spike_loss, self.mean,
                            *(e.to(device=device, dtype=torch.float64) for e in extra)])
        if dist.is_initialized():
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        return seen

    def check(self, step: int, grad_norm: Optional[float]) -> None:
        """Collective: raise if a policy says the run ends (one host read)."""
        self.judge(step, self.reduced().tolist(), grad_norm)

    def judge(self, step: int, seen: list[float], grad_norm: Optional[float]) -> None:
        """`reduced()` read to the host (a logging step reads it with everything else it
        logs, in one transfer): raise if a policy says the run ends."""
        bad, skip_run, spike, spike_loss, mean = seen[:5]
        if bad >= 0:
            raise stop("the training loss is not finite", int(bad), self.ckpt_dir)
        if spike >= 0:
            raise SpikeError(f"the training loss rose to {spike_loss:.4g}, above "
                             f"train.spike_factor {self.spike_factor:g} x its running mean "
                             f"({mean:.4g}), for {self.spike_steps} steps in a row "
                             f"(train.spike_steps)", int(spike), self.ckpt_dir)
        if self.skip:
            if skip_run >= self.max_skipped:
                raise stop(f"{int(skip_run)} steps in a row had a non-finite loss or gradient "
                           f"and were skipped (train.max_skipped_steps = {self.max_skipped})",
                           step, self.ckpt_dir)
        elif grad_norm is not None and not math.isfinite(grad_norm):
            raise stop(f"the gradient norm is {grad_norm}", step, self.ckpt_dir)
