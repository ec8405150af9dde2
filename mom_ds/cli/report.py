"""mom-report: one picture of a training run, for people who would rather look than read.

  mom-report RUN_DIR [--out REPORT.png]

Reads the scalars of the TensorBoard events under RUN_DIR/tb and the routing records of
RUN_DIR/routing.jsonl (what mom-train writes: one RoutingRecord per logged step, summed
over micro-batches and ranks) and renders REPORT.png (default RUN_DIR/report.png) plus
REPORT.html beside it: loss (train and val), learning rate, gradient norm, throughput and
MFU, and per routed block the SKIP rates and mean path length over training and a heat map of
module usage at the last logged step; a dotted line on every panel over steps marks each
step the run resumed at (run/resumed). Needs matplotlib.
"""
from __future__ import annotations

import argparse
import base64
import html
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import run_command
from ..files import json_rows
from ..model.routing import RoutingRecord
from ..train.monitor import ROUTING_FILE


@dataclass
class RunEvents:
    """Scalars as tag -> (steps, values); the routing records of the logged steps, in step
    order (routing.jsonl)."""

    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    routing: list[tuple[int, RoutingRecord]] = field(default_factory=list)

    @property
    def usage(self) -> dict[int, dict[str, np.ndarray]]:
        """Module usage of the last logged step: block -> half -> (router steps,
        modules + SKIP) counts."""
        if not self.routing:
            return {}
        return {c: {"attn": b.attn_counts.numpy(), "ffn": b.ffn_counts.numpy()}
                for c, b in enumerate(self.routing[-1][1].blocks)}

    @property
    def usage_step(self) -> Optional[int]:
        return self.routing[-1][0] if self.routing else None

    def block_series(self, block: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """attn_skip_rate, ffn_skip_rate and mean_path_length of one block over the steps."""
        steps = np.array([step for step, _ in self.routing])
        blocks = [record.blocks[block] for _, record in self.routing]
        return {"attn_skip_rate": (steps, np.array([b.skip_rate("attn") for b in blocks])),
                "ffn_skip_rate": (steps, np.array([b.skip_rate("ffn") for b in blocks])),
                "mean_path_length": (steps, np.array([b.mean_path_length for b in blocks]))}


def events_dir(run_dir: Path) -> Path:
    for candidate in (run_dir / "tb", run_dir):
        if any(candidate.glob("events.out.tfevents.*")):
            return candidate
    raise SystemExit(f"mom-report: no TensorBoard events in {run_dir}/tb or {run_dir}. Fix: "
                     f"pass a run directory written by mom-train (train.out_dir).")


def load_events(run_dir: Path) -> RunEvents:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0 keeps every point (the default samples 10,000 scalars, 500 histograms)
    acc = EventAccumulator(str(events_dir(run_dir)),
                           size_guidance={"scalars": 0, "histograms": 0}).Reload()
    run = RunEvents(routing=load_routing(run_dir))
    for tag in acc.Tags()["scalars"]:
        points = acc.Scalars(tag)
        run.scalars[tag] = (np.array([p.step for p in points]),
                            np.array([p.value for p in points]))
    return run


def load_routing(run_dir: Path) -> list[tuple[int, RoutingRecord]]:
    """RUN_DIR/routing.jsonl's records by step (none without the file). A line cut short
    (a full disk) is skipped with a warning."""
    path = run_dir / ROUTING_FILE
    if not path.is_file():
        return []
    records = [(row["step"], RoutingRecord.from_row(row))
               for _, row in json_rows(path, "mom-report: ")]
    return sorted(records, key=lambda item: item[0])


def panel_titles(run: RunEvents) -> list[str]:
    """The panels render() draws for this run, in order."""
    titles = ["loss", "learning rate", "gradient norm", "throughput"]
    for block in sorted(run.usage):
        titles += [f"block {block}: skip rate and path length", f"block {block}: module usage"]
    return titles


def render(run: RunEvents, title: str):
    """The report figure: 3 columns, one panel per title of panel_titles()."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    titles = panel_titles(run)
    n_rows = -(-len(titles) // 3)
    fig, axes = plt.subplots(n_rows, 3, figsize=(15, 4 * n_rows), squeeze=False)
    fig.suptitle(title)
    panels = iter(axes.flat)
    s = run.scalars
    resumes = s["run/resumed"][0].tolist() if "run/resumed" in s else []

    def lines(title: str, names: list[str], ylabel: str, series=s):
        """Next panel: the named series (default: scalars) over steps."""
        s = series
        ax = next(panels)
        ax.set_title(title)
        for name in names:
            if name in s:
                ax.plot(*s[name], marker="." if len(s[name][0]) < 50 else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        for i, step in enumerate(resumes):
            ax.axvline(step, color="grey", linestyle=":", label="resumed" if i == 0 else None)
        if len(ax.lines) > len(resumes):
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", transform=ax.transAxes)
        return ax

    def twin(ax, name: str, ylabel: str, scale: float = 1.0, series=s) -> None:
        """A second series (default: a scalar) on the panel's right axis, dashed."""
        s = series
        if name in s:
            right = ax.twinx()
            right.plot(s[name][0], scale * s[name][1], color="tab:red", linestyle="--")
            right.set_ylabel(ylabel, color="tab:red")

    lines("loss", ["train/loss", "train/lm_loss", "eval/loss"], "loss")
    lines("learning rate", ["train/lr"], "learning rate")
    lines("gradient norm", ["train/grad_norm"], "global gradient norm (before clipping)")
    twin(lines("throughput", ["perf/tokens_per_s"], "tokens/s"), "perf/mfu", "MFU % (dashed)",
         100.0)
    for block in sorted(run.usage):
        series = run.block_series(block)
        twin(lines(f"block {block}: skip rate and path length",
                   ["attn_skip_rate", "ffn_skip_rate"], "SKIP rate", series),
             "mean_path_length", "mean path length (dashed)", series=series)
        ax = next(panels)
        usage_heatmap(ax, run.usage[block])
        ax.set_title(f"block {block}: module usage")
    for ax in panels:  # unused cells of the last row
        ax.axis("off")
    fig.tight_layout()
    return fig


def usage_heatmap(ax, halves: dict[str, np.ndarray]) -> None:
    """Share of each router step's tokens per module: attention | FFN, last column SKIP."""
    blocks, labels = [], []
    for half in ("attn", "ffn"):
        if half in halves:
            counts = halves[half]
            blocks.append(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))
            labels += [f"{half}{i}" for i in range(counts.shape[1] - 1)] + [f"{half} SKIP"]
    image = ax.imshow(np.concatenate(blocks, axis=1), vmin=0, vmax=1, cmap="viridis",
                      aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    ax.set_yticks(range(len(blocks[0])))
    ax.set_ylabel("router step")
    ax.figure.colorbar(image, ax=ax, label="share of tokens")


def write_html(run: RunEvents, png: Path, title: str) -> Path:
    """REPORT.html: the picture inline plus the last value of every scalar."""
    rows = "".join(f"<tr><td>{html.escape(tag)}</td><td>{steps[-1]}</td><td>{values[-1]:.6g}"
                   f"</td></tr>" for tag, (steps, values) in sorted(run.scalars.items()))
    image = base64.b64encode(png.read_bytes()).decode()
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<h1>{html.escape(title)}</h1><img src='data:image/png;base64,{image}' "
            f"style='max-width:100%'><h2>Last values</h2><table border=1 cellpadding=3>"
            f"<tr><th>tag</th><th>step</th><th>value</th></tr>{rows}</table>")
    out = png.with_suffix(".html")
    out.write_text(page)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mom-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="train.out_dir of a mom-train run")
    parser.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/report.png)")
    args = parser.parse_args(argv)
    return run_command("mom-report", lambda: report(args))


def report(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("mom-report: matplotlib is not installed. Fix: pip install matplotlib",
              file=sys.stderr)
        return 1
    run = load_events(args.run_dir)
    if not run.scalars:
        print(f"mom-report: the events in {args.run_dir} hold no scalars yet (the run logs "
              f"every train.log_interval steps).", file=sys.stderr)
        return 1
    png = args.out or args.run_dir / "report.png"
    title = f"mom-report: {args.run_dir}"
    fig = render(run, title)
    fig.savefig(png, dpi=80)
    page = write_html(run, png, title)
    print(f"wrote {png} ({len(panel_titles(run))} panels) and {page}")
    from ..train.profiling import trace_dir

    traces = sorted(trace_dir(args.run_dir).glob("*.pt.trace.json"))
    if traces:
        print(f"profiler traces (train.profile_steps): {', '.join(str(t) for t in traces)}; "
              f"view with tensorboard --logdir {trace_dir(args.run_dir)} (torch-tb-profiler) "
              f"or https://ui.perfetto.dev")
    return 0


if __name__ == "__main__":
    sys.exit(main())
