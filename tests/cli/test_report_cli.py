"""mom-report on a run directory written by the trainer's Monitor: the PNG opens and has
the expected panels, the HTML holds it and the last values."""
from __future__ import annotations

import pytest
import torch

from mom_ds.cli import report
from mom_ds.model import MoMConfig, MoMForCausalLM
from mom_ds.model.routing import RoutingRecord
from mom_ds.train.monitor import Monitor

pytest.importorskip("matplotlib", reason="mom-report needs matplotlib (launch/ci_setup.sh)")
Image = pytest.importorskip("PIL.Image",
                            reason="the report check reads its PNG with Pillow (matplotlib's)")

TINY = dict(vocab_size=257, n_positions=32, d_model=32, n_heads=2, n_bottom=1, n_routed_blocks=2,
            anchor_layers=False, n_top=1, n_attn_modules=3, n_ffn_modules=4, depth=3, top_k=1,
            router="gru", router_width=16)


@pytest.fixture
def run_dir(tmp_path):
    """Five logged steps as mom-train logs them (scalars + routing), on rank 0."""
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**TINY))
    monitor = Monitor(tmp_path, enabled=True)
    for step in range(1, 6):
        stats = RoutingRecord()
        for _ in range(2):  # micro-batches
            stats = stats + model(torch.randint(0, 257, (2, 16))).routing
        monitor.scalars(step, {"train/loss": 5.0 - 0.2 * step, "train/lr": 1e-3 * step,
                               "perf/tokens_per_s": 1000.0 + step, "perf/mfu": 0.01})
        monitor.routing(step, stats)
    monitor.scalars(5, {"eval/loss": 4.5})
    monitor.close()
    return tmp_path


def test_report_png_and_html(run_dir, tmp_path):
    png = tmp_path / "out" / "summary.png"
    png.parent.mkdir()
    assert report.main([str(run_dir), "--out", str(png)]) == 0

    run = report.load_events(run_dir)
    titles = report.panel_titles(run)
    assert titles == ["loss", "learning rate", "gradient norm", "throughput",
                      "block 0: skip rate and path length", "block 0: module usage",
                      "block 1: skip rate and path length", "block 1: module usage"]
    figure = report.render(run, "test")
    drawn = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert drawn == titles
    assert run.usage[0]["attn"].shape == (3, 4) and run.usage[1]["ffn"].shape == (3, 5)
    assert run.usage_step == 5

    with Image.open(png) as image:
        image.verify()  # a complete, valid PNG
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width == 15 * 80 and image.height == 12 * 80
    page = png.with_suffix(".html").read_text()
    assert "data:image/png;base64," in page and "eval/loss" in page and "train/loss" in page


def test_report_without_events_says_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="no TensorBoard events"):
        report.main([str(tmp_path)])


def test_report_reads_the_values_the_run_logged(run_dir):
    """mom-report's routing (routing.jsonl) against what TensorBoard holds for the same
    steps, read independently with EventAccumulator: skip rates, mean path length, and the heat
    map's counts (the usage histograms' buckets)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"),
                              size_guidance={"scalars": 0, "histograms": 0}).Reload()
    run = report.load_events(run_dir)
    assert [step for step, _ in run.routing] == [1, 2, 3, 4, 5]
    for block in (0, 1):
        series = run.block_series(block)
        for name in ("attn_skip_rate", "ffn_skip_rate", "mean_path_length"):
            logged = events.Scalars(f"routing/block{block}/{name}")
            assert series[name][0].tolist() == [e.step for e in logged]
            assert series[name][1] == pytest.approx([e.value for e in logged], rel=1e-6)
        for half in ("attn", "ffn"):
            usage = run.usage[block][half]
            for h, row in enumerate(usage):
                last = events.Histograms(f"routing/block{block}/{half}_usage_step{h}")[-1]
                assert last.step == 5
                assert row.tolist() == list(last.histogram_value.bucket)
            # each router step: 2 micro-batches of 2 x 16 tokens, one choice each (top-1)
            assert usage.sum(axis=1).tolist() == [2 * 2 * 16] * 3


def test_routing_rows_after_a_resumed_step_are_dropped(tmp_path):
    """A resume (or a spike rewind) to step 2 drops the rows after it, as metrics.jsonl's;
    the replayed steps then appear once."""
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**TINY))
    record = model(torch.randint(0, 257, (2, 16))).routing
    monitor = Monitor(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        monitor.routing(step, record)
    monitor.rewind(2)
    monitor.routing(3, record)
    monitor.close()
    monitor = Monitor(tmp_path, enabled=True, resumed_step=3)
    monitor.routing(4, record)
    monitor.close()
    assert [step for step, _ in report.load_routing(tmp_path)] == [1, 2, 3, 4]
