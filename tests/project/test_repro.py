"""bench/repro.py: --quick trains every arm on a tiny corpus of HTML pages made here (GPT-2
tokens, through mom-prep) and writes the table with every column, the claims and the PNG;
a bad --data is one error."""
from __future__ import annotations

import html
import json

import pytest

from mom_ds_testing.runs import REPO, run_python

import repro

ARMS = {"donor", "vanilla_continued", "mom_deep", "mom_shallow", "mom_scratch", "mod", "moe",
        "vanilla5"}


def write_pages(directory, count: int = 60) -> None:
    """The first pydoc reference topics, one HTML page each."""
    from pydoc_data.topics import topics

    directory.mkdir()
    for i, text in enumerate(list(topics.values())[:count]):
        paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in text.split("\n\n"))
        (directory / f"{i:03d}.html").write_text(
            f"<html><head><script>x()</script></head><body>{paragraphs}</body></html>")


@pytest.mark.slow
def test_quick_runs_every_arm_and_writes_table_claims_and_figure(tmp_path,
                                                                 shared_gpt2_tokenizer_dir):
    from data_prep.cli import main as mom_prep

    write_pages(tmp_path / "pages")
    data = tmp_path / "data"
    assert mom_prep(["--source", str(tmp_path / "pages" / "*.html"), "--tokenizer",
                     f"gpt2:{shared_gpt2_tokenizer_dir}", "--val-fraction", "0.2",
                     "--out", str(data), "--quiet"]) == 0
    out = tmp_path / "out"
    proc = run_python([str(REPO / "bench" / "repro.py"), "--quick", "--data", str(data),
                       "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "repro.json").read_text())
    assert set(results["rows"]) == ARMS
    for row in results["rows"].values():
        assert row["val_loss"] > 0 and row["params"] > 0 and row["tokens_per_s"] > 0
        assert row["train_flops_per_token"] > 0 and row["peak_memory_gb"] > 0
        assert row["curve"]["loss"], row["key"]
    donor_acc = results["rows"]["donor"]["mom_cloze_acc"]  # None where lm_eval is missing
    assert donor_acc is None or 0 <= donor_acc <= 1
    assert [c["layers"] for c in results["compression"]] == [6, 2]

    table = (out / "repro.md").read_text()
    header = "| " + " | ".join(repro.COLUMNS) + " |"
    assert table.count(header) == len(repro.TABLES)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line != header]
    assert all(line.count("|") == len(repro.COLUMNS) + 1 for line in rows[:9])  # 9 arm rows
    claims = [line for line in table.splitlines() if line.startswith("- ")]
    assert len(claims) == 7  # the four of the issue, MoE, two-stage vs scratch, modular
    assert all(" HOLDS at this scale" in c or "DOES NOT HOLD at this scale" in c for c in claims)
    assert (out / "repro.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_modular_claim_needs_every_ratio_to_beat_both_baselines():
    def row(ratio, search, drop, kd):
        return {"ratio": ratio, "search": {"loss": search}, "drop": {"loss": drop},
                "kd": {"loss": kd}}

    beats = [row(2, 5.0, 5.1, 5.2), row(3, 5.3, 5.4, 5.35)]
    assert "HOLDS at this scale" in repro.modular_claim(beats)
    worse_at_3x = [beats[0], row(3, 5.36, 5.4, 5.35)]  # the KD student wins at 3x
    line = repro.modular_claim(worse_at_3x)
    assert "DOES NOT HOLD" in line and "3x: 5.3600 vs 5.4000 and 5.3500" in line


def test_bad_data_directory_is_one_error(tmp_path):
    proc = run_python([str(REPO / "bench" / "repro.py"), "--quick", "--data",
                       str(tmp_path / "missing"), "--out", str(tmp_path / "out")], timeout=120)
    assert proc.returncode == 1
    assert "--data" in proc.stderr and "Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
