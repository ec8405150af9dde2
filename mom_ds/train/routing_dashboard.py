"""Routing dashboards in TensorBoard: what no anchor logs for a routed model.

For every routed block, at one step:
  routing/block{c}/usage          image: heat map of module usage, one row per router step,
                                  attention modules then FFN modules, last column of each
                                  = SKIP; a cell is the share of that step's tokens (0 dark,
                                  1 bright), so images of different steps compare directly
  routing/block{c}/{attn,ffn}_skip_rate          share of choices that were SKIP
  routing/block{c}/{attn,ffn}_load_max_over_mean busiest module / mean module load
                                                 (1 = perfectly balanced; worst router step)
  routing/block{c}/{attn,ffn}_load_cv            coefficient of variation of module loads
                                                 (std / mean, averaged over router steps)
  routing/block{c}/{attn,ffn}_tokens_module{j}  choices of module j, summed over the steps
  routing/block{c}/{attn,ffn}_dead_modules       modules no token chose at any step
  routing/block{c}/{attn,ffn}_usage_step{h}     histogram: choices per module (last = SKIP)
  routing/block{c}/path_length    histogram of path length per token (modules it ran)
  routing/block{c}/mean_path_length, routing/block{c}/balance_loss
  routing/block{c}/dropped_tokens  assignments a capacity limit removed
  routing/mod{i}/selected_share    share of its tokens MoD block i processed
With expert parallelism (the record's comm):
  comm/all_to_all_bytes, comm/all_to_all_ms

`log_routing` takes a RoutingRecord (model/routing.py: one forward's `MoMOutput.routing`,
or a sum of them) and a SummaryWriter; numpy renders the images, so matplotlib is not
needed here. The same record's values go to routing.jsonl (train/monitor.py), which is
what mom-report reads: nothing reads these tags back but TensorBoard.
"""
from __future__ import annotations

import numpy as np
import torch

from ..model.routing import RoutingRecord

CELL_PX = 12   # heat-map cell size in pixels
GAP_PX = 4     # blank columns between the attention and the FFN half
# A dark-blue -> teal -> yellow ramp (viridis' end points): readable, and grey-scale safe.
RAMP = np.array([[0.27, 0.00, 0.33], [0.13, 0.57, 0.55], [0.99, 0.91, 0.14]])


def shares(counts: torch.Tensor) -> np.ndarray:
    """(H, M) choice counts -> share of each router step's choices per module."""
    c = counts.detach().double().cpu().numpy()
    return c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (…, 3) RGB along RAMP."""
    x = np.clip(values, 0.0, 1.0) * (len(RAMP) - 1)
    lo = np.minimum(x.astype(int), len(RAMP) - 2)
    t = (x - lo)[..., None]
    return RAMP[lo] * (1 - t) + RAMP[lo + 1] * t


def usage_image(attn_counts: torch.Tensor, ffn_counts: torch.Tensor) -> np.ndarray:
    """(3, H*CELL_PX, W) float image in [0, 1]: attention shares | gap | FFN shares."""
    attn, ffn = colorize(shares(attn_counts)), colorize(shares(ffn_counts))
    gap = np.ones((attn.shape[0], 1, 3))
    cells = np.concatenate([attn, gap, ffn], axis=1)
    image = np.repeat(np.repeat(cells, CELL_PX, axis=0), CELL_PX, axis=1)
    gap_start = attn.shape[1] * CELL_PX
    image = np.concatenate([image[:, :gap_start], np.ones((image.shape[0], GAP_PX, 3)),
                            image[:, gap_start + CELL_PX:]], axis=1)
    return image.transpose(2, 0, 1)


def load_balance(counts: np.ndarray) -> tuple[float, float]:
    """(worst max/mean load, mean coefficient of variation) over router steps, of the
    modules only (SKIP is a choice, not a module with a load to balance)."""
    loads = counts[:, :-1]
    mean = loads.mean(axis=1)
    used = mean > 0  # a step where every token skipped has no load to balance
    if not used.any():
        return 1.0, 0.0
    max_over_mean = (loads.max(axis=1)[used] / mean[used]).max()
    cv = (loads.std(axis=1)[used] / mean[used]).mean()
    return float(max_over_mean), float(cv)


def write_count_histogram(writer, name: str, values: np.ndarray, counts: np.ndarray,
                          step: int) -> None:
    """A TensorBoard histogram from counts per value (bucket i holds value i's count)."""
    edges = np.concatenate([(values[1:] + values[:-1]) / 2, values[-1:] + 0.5])
    writer.add_histogram_raw(
        name, min=float(values[0]), max=float(values[-1]), num=float(counts.sum()),
        sum=float((values * counts).sum()), sum_squares=float((values * values * counts).sum()),
        bucket_limits=edges.tolist(), bucket_counts=counts.tolist(), global_step=step)


def log_routing(writer, step: int, routing: RoutingRecord) -> None:
    """Write the dashboard of one step."""
    for c, block in enumerate(routing.blocks):
        tag = f"routing/block{c}"
        writer.add_image(f"{tag}/usage", usage_image(block.attn_counts, block.ffn_counts), step)
        for half, counts in (("attn", block.attn_counts), ("ffn", block.ffn_counts)):
            counts = counts.detach().double().cpu().numpy()
            writer.add_scalar(f"{tag}/{half}_skip_rate", block.skip_rate(half), step)
            max_over_mean, cv = load_balance(counts)
            writer.add_scalar(f"{tag}/{half}_load_max_over_mean", max_over_mean, step)
            writer.add_scalar(f"{tag}/{half}_load_cv", cv, step)
            per_module = counts[:, :-1].sum(axis=0)  # choices of each module, all steps
            for j, n in enumerate(per_module):
                writer.add_scalar(f"{tag}/{half}_tokens_module{j}", n, step)
            writer.add_scalar(f"{tag}/{half}_dead_modules", int((per_module == 0).sum()), step)
            for h, row in enumerate(counts):  # bucket = module id
                write_count_histogram(writer, f"{tag}/{half}_usage_step{h}",
                                      np.arange(len(row), dtype=np.float64), row, step)
        tokens = block.path_length_hist.detach().double().cpu().numpy()
        if tokens.sum() > 0:
            lengths = np.arange(len(tokens), dtype=np.float64) / 2
            write_count_histogram(writer, f"{tag}/path_length", lengths, tokens, step)
            writer.add_scalar(f"{tag}/mean_path_length", block.mean_path_length, step)
        writer.add_scalar(f"{tag}/balance_loss",
                          float(block.balance_loss.detach().mean()) / block.calls, step)
        writer.add_scalar(f"{tag}/dropped_tokens", float(block.dropped), step)
    for i, share in enumerate(routing.mod_shares()):
        writer.add_scalar(f"routing/mod{i}/selected_share", share, step)
    if routing.comm is not None:
        writer.add_scalar("comm/all_to_all_bytes", routing.all_to_all_bytes, step)
        writer.add_scalar("comm/all_to_all_ms", 1e3 * routing.all_to_all_seconds, step)
