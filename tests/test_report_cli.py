"""mom-report on a run directory written by the trainer's Monitor: the PNG opens and has
the expected panels, the HTML holds it and the last values."""
from __future__ import annotations

import pytest
import torch

from mom_ds.cli import report
from mom_ds.model import MoMConfig, MoMForCausalLM
from mom_ds.train.monitor import Monitor, RoutingStats

pytest.importorskip("matplotlib", reason="mom-report needs matplotlib (launch/ci_setup.sh)")
Image = pytest.importorskip("PIL.Image")

TINY = dict(vocab_size=257, n_positions=32, d_model=32, n_heads=2, n_bottom=1, n_chunks=2,
            anchor_layers=False, n_top=1, n_attn_modules=3, n_ffn_modules=4, depth=3, top_k=1,
            router="gru", router_width=16)


@pytest.fixture
def run_dir(tmp_path):
    """Five logged steps as mom-train logs them (scalars + routing), on rank 0."""
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**TINY))
    monitor = Monitor(tmp_path, enabled=True)
    for step in range(1, 6):
        stats = RoutingStats()
        stats.add(model(torch.randint(0, 257, (2, 16))).routing)
        monitor.scalars(step, {"train/loss": 5.0 - 0.2 * step, "train/lr": 1e-3 * step,
                               "perf/tokens_per_s": 1000.0 + step, "perf/mfu": 0.01})
        monitor.routing(step, stats.blocks)
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
                      "block 0: skip rate and depth", "block 0: module usage",
                      "block 1: skip rate and depth", "block 1: module usage"]
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
