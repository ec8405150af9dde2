"""The routing dashboard: what log_routing writes is read back with EventAccumulator."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from mom_ds.model import MoMConfig, MoMForCausalLM
from mom_ds.train.routing_dashboard import CELL_PX, GAP_PX, load_balance, log_routing

TINY = dict(vocab_size=257, n_positions=32, d_model=32, n_heads=2, n_bottom=1, n_routed_blocks=2,
            anchor_layers=False, n_top=1, n_attn_modules=3, n_ffn_modules=4, depth=3, top_k=1,
            router="gru", router_width=16)


def test_load_balance_statistics():
    balanced = np.array([[5, 5, 5, 5, 7]])        # SKIP (last) is not a module load
    assert load_balance(balanced) == (1.0, 0.0)
    one_hot = np.array([[8, 0, 0, 0, 1], [2, 2, 2, 2, 0]])
    max_over_mean, cv = load_balance(one_hot)
    assert max_over_mean == 4.0                        # the worst router step
    assert cv == pytest.approx(math.sqrt(3) / 2)       # mean of sqrt(3) and 0
    assert load_balance(np.array([[0, 0, 9]])) == (1.0, 0.0)  # everything skipped


def test_dashboard_read_back(tmp_path):
    torch.manual_seed(0)
    config = MoMConfig(**TINY)
    model = MoMForCausalLM(config)
    routing = model(torch.randint(0, 257, (2, 16))).routing
    assert len(routing.blocks) == 2
    writer = SummaryWriter(str(tmp_path))
    for step in (1, 2):
        routing.comm = torch.tensor([1024.0 * step, 0.002], dtype=torch.float64)
        log_routing(writer, step, routing)
    writer.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    for c, block in enumerate(routing.blocks):
        tag = f"routing/block{c}"
        for name in ("attn_skip_rate", "ffn_skip_rate", "attn_load_max_over_mean",
                     "ffn_load_cv", "mean_path_length", "balance_loss", "dropped_tokens"):
            assert [e.step for e in events.Scalars(f"{tag}/{name}")] == [1, 2], name
        # tokens per module, summed over the steps by hand, and the modules none chose
        for half, counts in (("attn", block.attn_counts), ("ffn", block.ffn_counts)):
            pool = counts.shape[1] - 1
            for j in range(pool):
                by_hand = sum(int(counts[h, j]) for h in range(config.depth))
                assert events.Scalars(f"{tag}/{half}_tokens_module{j}")[0].value == by_hand
            dead = sum(all(int(counts[h, j]) == 0 for h in range(config.depth))
                       for j in range(pool))
            assert events.Scalars(f"{tag}/{half}_dead_modules")[0].value == dead
        skip = events.Scalars(f"{tag}/attn_skip_rate")[0].value
        counts = block.attn_counts.double()
        assert skip == pytest.approx(float(counts[:, -1].sum() / counts.sum()), rel=1e-6)
        levels = torch.arange(2 * config.depth + 1) / 2  # depth 0, 0.5, ... H
        mean_path_length = float((levels * block.path_length_hist).sum() / block.path_length_hist.sum())
        assert events.Scalars(f"{tag}/mean_path_length")[0].value == pytest.approx(mean_path_length,
                                                                            rel=1e-6)
        # one histogram entry per token, within [0, depth]
        histogram = events.Histograms(f"{tag}/path_length")[-1].histogram_value
        assert histogram.num == int(block.path_length_hist.sum()) == 2 * 16
        assert 0 <= histogram.min and histogram.max <= config.depth
        # heat map: H rows; attention (A + SKIP) | gap | FFN (F + SKIP) columns
        image = events.Images(f"{tag}/usage")[-1]
        assert image.height == config.depth * CELL_PX
        assert image.width == (config.n_attn_modules + 1 + config.n_ffn_modules + 1) * CELL_PX \
            + GAP_PX
    assert tags["scalars"].count("comm/all_to_all_bytes") == 1
    assert [e.value for e in events.Scalars("comm/all_to_all_bytes")] == [1024, 2048]
    assert events.Scalars("comm/all_to_all_ms")[0].value == pytest.approx(2.0)
