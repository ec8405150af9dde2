"""The training loop: gradient accumulation, evaluation, logging and checkpoints. One
visible loop; DeepSpeed does the backward, the gradient reduction (expert parameters over
their expert-data-parallel group), the clipping, the optimizer step of every parameter and
the learning-rate schedule's (both configured in optimizer.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..checkpoints.format import newest_before
from ..config import RunConfig, TrainConfig
from ..files import replaced
from . import checkpoint, stopping
from .batches import Batches
from .health import Health, SpikeError
from .profiling import StepProfiler
from .stopping import StopAgreement
from ..parallel.parallelize import ParallelLayout
from .monitor import Monitor, device_peak_tflops
from ..model.contract import TrainableLM
from ..model.routing import RoutingRecord
from .step_log import read_step
from ..evaluation import Windows, score


def format_eta(seconds: float) -> str:
    """Time left at the current pace (evaluations and checkpoints not included)."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class Progress:
    step: int = 0          # optimizer steps done
    tokens_seen: int = 0   # tokens trained on, all ranks
    health: dict[str, Any] = field(default_factory=dict)  # Health.state_dict() at the step


def train(run: RunConfig, engine, model: TrainableLM, layout: ParallelLayout, batches: Batches,
          val: Windows, progress: Progress, monitor: Monitor,
          stop_after: Optional[int] = None) -> dict[str, float]:
    """Train from progress.step to train.max_steps (or to stop_after, checkpointing there).
    Returns the last evaluation."""
    t = run.train
    stop = min(t.max_steps, stop_after) if stop_after else t.max_steps
    world = dist.get_world_size()
    ckpt_dir = Path(t.out_dir) / "ckpt"
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * world * run.data.seq_len
    peak, peak_source = device_peak_tflops(t.peak_tflops)
    if progress.step == 0 and monitor.enabled:
        print(f"training {t.max_steps} steps x {tokens_per_step} tokens on {world} rank(s); "
              f"MFU against {peak} TFLOP/s per device ({peak_source})", flush=True)
    last_eval: dict[str, float] = {}
    health = Health(batches.device, ckpt_dir, t, progress.health)
    spikes_skipped = 0
    agreement = StopAgreement(stopping.REQUEST, timedelta(minutes=run.parallel.timeout_minutes))
    profiler = StepProfiler(t.profile_steps, t.out_dir)
    window_start, window_steps, data_seconds = time.perf_counter(), 0, 0.0
    while progress.step < stop:
        step = progress.step
        logging = t.log_interval and ((step + 1) % t.log_interval == 0 or step == 0
                                      or step + 1 == t.max_steps)
        lr = engine.get_lr()[0]  # the rate this step uses (the engine steps it afterwards)
        model.begin_step(step)
        profiler.before_step(step)
        stats = RoutingRecord() if logging else None  # summed over micro-batches
        sums: dict[str, torch.Tensor] = {}  # loss and its terms: no host sync per step
        for _ in range(t.grad_accum_steps):
            fetch_start = time.perf_counter()
            x, y = batches.next()
            data_seconds += time.perf_counter() - fetch_start
            out = engine(x, labels=y, loss_chunk_tokens=t.loss_chunk_tokens)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer and LR only at the boundary
            health.record(step + 1, out.loss)
            for name, value in {"loss": out.loss, **out.terms}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            if stats is not None:
                stats = stats + out.routing
        health.step_loss(step + 1, sums["loss"] / t.grad_accum_steps)
        health.stepped(engine.was_step_applied())
        progress.step += 1
        progress.tokens_seen += tokens_per_step
        profiler.after_step(progress.step)
        window_steps += 1
        stop_requested = agreement.should_stop()  # a signal: save here and exit (stopping.py)

        done = progress.step == t.max_steps
        # every checkpoint is scored, so pruning can keep the best one (published.best_tag)
        saving = stop_requested or progress.step == stop or (
            t.ckpt_interval and progress.step % t.ckpt_interval == 0)
        evaluating = done or saving or (t.eval_interval and progress.step % t.eval_interval == 0)
        reading = None
        if logging or evaluating or saving:  # where the loop syncs anyway
            grad_norm = engine.get_global_grad_norm()
            try:
                if logging:  # the health flags come in the logging step's one transfer
                    reading = read_step(sums, t.grad_accum_steps, stats, health, grad_norm,
                                        engine.module)
                    health.judge(progress.step, reading.health, reading.grad_norm)
                else:  # a host float or a device tensor: float() reads either
                    health.check(progress.step, None if grad_norm is None else float(grad_norm))
            except SpikeError as spike:
                if t.spike_policy != "skip" or spikes_skipped == t.max_spike_skips:
                    raise
                spikes_skipped += 1
                health = skip_spike(spike, engine, model, layout, ckpt_dir, progress, t,
                                    batches.device, monitor)
                window_start, window_steps, data_seconds = time.perf_counter(), 0, 0.0
                continue

        if reading is not None:
            elapsed = time.perf_counter() - window_start
            tok_s = window_steps * tokens_per_step / elapsed
            # the FLOPs of the routing taken, from the host copies of what it chose
            fpt = model.train_flops_per_token(run.data.seq_len, out, reading.routing)
            losses = {f"train/{name}": v for name, v in reading.losses.items()}
            values = {**losses, "train/lr": lr, "perf/tokens_per_s": tok_s,
                      "perf/flops_per_s": tok_s * fpt, "perf/flops_per_token": fpt,
                      "perf/mfu": tok_s * fpt / (peak * 1e12 * world),
                      "perf/step_time_s": elapsed / window_steps,
                      "perf/data_time_s": data_seconds / window_steps,
                      "perf/memory_gb": reading.memory_gb,
                      "train/tokens_seen": progress.tokens_seen}
            if reading.grad_norm is not None:
                values["train/grad_norm"] = reading.grad_norm
            skipped = ""
            if t.nan_policy == "skip":  # DeepSpeed's count, kept in its checkpoints
                values["train/skipped_steps"] = engine.skipped_steps
                skipped = f" skipped {engine.skipped_steps}" if engine.skipped_steps else ""
            eta = (stop - progress.step) * elapsed / window_steps
            monitor.scalars(progress.step, values, echo=(
                f"step {progress.step}/{t.max_steps} loss {losses['train/loss']:.4f} "
                f"lr {lr:.2e} {tok_s:,.0f} tok/s mfu {100 * values['perf/mfu']:.2f}% "
                f"eta {format_eta(eta)}{skipped}"))
            monitor.routing(progress.step, reading.routing)
            window_start, window_steps, data_seconds = time.perf_counter(), 0, 0.0

        if evaluating:
            # the forward FLOPs of the routing the val windows took (a modular student's
            # assembly is drawn per step: no one number)
            last_eval = score(engine, val, loss_chunk_tokens=t.loss_chunk_tokens,
                              config=None if run.modular.enabled else run.model).scalars()
            monitor.scalars(progress.step, last_eval, echo=(
                f"step {progress.step} val loss {last_eval['eval/loss']:.4f} "
                f"ppl {last_eval['eval/ppl']:.2f}"))
        if saving:
            progress.health = health.state_dict()
            tag = save(run, engine, model, layout, batches, progress, ckpt_dir,
                       last_eval["eval/loss"])
            if stop_requested and progress.step < stop:  # at the end, the run just ends
                raise agreement.stop(progress.step, tag, ckpt_dir, monitor)
        if evaluating or saving:  # their time is not training time
            window_start, window_steps, data_seconds = time.perf_counter(), 0, 0.0
    agreement.close()
    return last_eval


def save(run: RunConfig, engine, model, layout: ParallelLayout, batches: Batches,
         progress: Progress, ckpt_dir: Path, eval_loss: float) -> str:
    client = {"config": run.to_dict(), "step": progress.step,
              "tokens_seen": progress.tokens_seen, "sampler": batches.state_dict(),
              "health": progress.health, "eval_loss": eval_loss}
    tag = checkpoint.save(engine, model, layout, ckpt_dir, progress.step, client,
                          keep=run.train.keep_checkpoints)
    if dist.get_rank() == 0:  # the config of the newest checkpoint, as it was trained
        write_config(run, ckpt_dir.parent)
    return tag


def write_config(run: RunConfig, out_dir: Path) -> None:
    """out_dir/config.yaml, replaced atomically: a reader sees the old or the new config."""
    with replaced(out_dir / "config.yaml") as tmp:
        run.save(tmp)


def skip_spike(spike: SpikeError, engine, model, layout: ParallelLayout, ckpt_dir: Path,
               progress: Progress, t: TrainConfig, device, monitor: Monitor) -> Health:
    """train.spike_policy skip (PaLM's remedy): back to the newest complete checkpoint from
    before the spike, weights, optimizer and schedule, while the data goes on from where it
    is, so the batches since that checkpoint are never trained on again. Collective. Raises
    the spike when there is no such checkpoint. Returns the checkpoint's Health."""
    tag = newest_before(ckpt_dir, spike.step)
    if tag is None:
        raise spike
    client = checkpoint.load(engine, model, layout, ckpt_dir, tag)
    back = progress.step
    progress.step, progress.tokens_seen = client["step"], client["tokens_seen"]
    progress.health = client.get("health", {})
    monitor.rewind(progress.step)
    if monitor.enabled:
        print(f"warning: {spike.what} at step {spike.step}; train.spike_policy skip: back "
              f"to {ckpt_dir / tag} (step {progress.step}), the batches of steps "
              f"{progress.step + 1}-{back} skipped", flush=True)
    return Health(device, ckpt_dir, t, progress.health)
