"""bench/repro.py: --quick trains every arm of two seeds on a tiny corpus of HTML pages made
here (GPT-2 tokens, through mom-prep) and writes the table with every column, the claims and
the PNG; the verdict rule on hand-made differences; the GPU plan's recipes load; a bad
--data is one error."""
from __future__ import annotations

import html
import json

import numpy as np
import pytest
import torch

from mom_ds_testing.runs import REPO, run_python

import repro
import repro_arms
import repro_claims as claims_rule

ARMS = {"donor", "vanilla_continued", "mom_deep", "mom_shallow", "mom_scratch", "mod", "moe",
        "llama_vanilla", "llama_mom"}


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
        assert row["params"] > 0 and set(row["seeds"]) == {"1", "2"}
        for m in row["seeds"].values():
            assert m["val_loss"] > 0 and m["tokens_per_s"] > 0 and m["curve"]["loss"]
            assert m["train_flops_per_token"] > 0 and m["peak_memory_gb"] > 0
    # the seeds differ: initialisation and window order
    donor = results["rows"]["donor"]["seeds"]
    assert donor["1"]["val_loss"] != donor["2"]["val_loss"]
    assert set(results["compression"]) == {"1", "2"}
    assert [c["layers"] for c in results["compression"]["1"]] == [3, 2]
    assert results["teacher"]["val_loss"] > 0
    assert sorted(results["teacher"]["continued"]) == sorted(results["compression"])
    assert results["unigram_ppl"] > 1

    table = (out / "repro.md").read_text()
    header = "| " + " | ".join(repro.COLUMNS) + " |"
    assert table.count(header) == len(repro.TABLES)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line != header]
    assert all(line.count("|") == len(repro.COLUMNS) + 1 for line in rows[:10])  # 10 arm rows
    claims = [line for line in table.splitlines() if line.startswith("- ")]
    assert len(claims) == 8  # seven of the papers' and the Llama-family pair
    words = ("HOLDS at this scale", "DOES NOT HOLD at this scale", "INCONCLUSIVE at this scale")
    assert all(any(w in c for w in words) for c in claims)
    assert claims_rule.RULE in table
    assert (out / "repro.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_verdict_rule_on_hand_made_differences():
    v = claims_rule.verdict
    assert v([-0.01, -0.02, -0.001]) == "HOLDS"
    assert v([0.01, 0.02, 0.001]) == "DOES NOT HOLD"
    assert v([-0.01, 0.02, -0.001]) == "INCONCLUSIVE"  # signs differ, mean within 2 sd
    # signs differ but the mean is more than twice the spread: mean -0.0455, sd 0.0146
    many = [-0.05] * 9 + [0.0001]
    assert v(many) == "HOLDS"
    assert v([-0.5]) == "INCONCLUSIVE"  # one seed decides nothing
    assert v([0.0, -0.01]) == "INCONCLUSIVE"  # a tie is neither sign
    assert claims_rule.combined(["HOLDS", "HOLDS"]) == "HOLDS"
    assert claims_rule.combined(["HOLDS", "DOES NOT HOLD"]) == "INCONCLUSIVE"
    # a side condition not met decides against the claim whatever the seeds say
    line = claims_rule.line("X", [-0.1, -0.2], "evidence", (False, "fewer FLOPs"))
    assert "DOES NOT HOLD" in line and "fewer FLOPs: NO" in line


def test_an_arm_on_fewer_seeds_pairs_only_the_seeds_it_has():
    """The Llama pair runs on 2 of 3 seeds: its claim pairs those 2, and the other claims
    keep all 3 (not the seeds every arm has)."""
    def row(losses):
        return {"seeds": {seed: {"val_loss": v} for seed, v in losses.items()}}
    rows = {"a": row({1: 4.0, 2: 4.0, 3: 4.0}), "b": row({1: 5.0, 2: 5.0, 3: 2.0}),
            "c": row({1: 2.0, 2: 8.0})}
    loss = repro.per_seed(rows)
    assert claims_rule.loss_gap(loss, "a", "b") == pytest.approx([-0.2, -0.2, 1.0])
    assert claims_rule.loss_gap(loss, "c", "a") == pytest.approx([-0.5, 1.0])


def test_modular_claim_needs_every_seed_and_ratio_to_agree():
    def row(ratio, search, drop, kd):
        return {"ratio": ratio, "search": {"loss": search}, "drop": {"loss": drop},
                "kd": {"loss": kd}}

    teacher = {"late_fall": 0.03, "val_loss": 4.0, "continued": {1: 4.01, 2: 3.97}}
    beats = {1: [row(2, 5.0, 5.1, 5.2), row(3, 5.3, 5.4, 5.35)],
             2: [row(2, 5.01, 5.1, 5.2), row(3, 5.31, 5.4, 5.35)]}
    assert ": HOLDS at this scale" in repro.modular_claim(beats, teacher)
    # seed 2's KD student wins at 3x: 3x is inconclusive, so is the claim
    split = {1: beats[1], 2: [beats[2][0], row(3, 5.36, 5.4, 5.35)]}
    line = repro.modular_claim(split, teacher)
    assert ": INCONCLUSIVE at this scale" in line and "2x HOLDS" in line and "3x INCONCLUSIVE" in line
    assert "+0.25%, -0.75% by seed, settled" in line and "fell 3.00% over" in line
    gained = dict(teacher, continued={1: 4.01, 2: 3.95})  # seed 2: 1.25% from more training
    assert "NOT settled" in repro.modular_claim(beats, gained)


def test_settled_asks_every_seed_to_gain_under_one_percent():
    gains, done = repro.settled({"val_loss": 4.0, "continued": {2: 3.98, 1: 4.1}})
    assert gains == {1: pytest.approx(-0.025), 2: pytest.approx(0.005)} and done
    assert not repro.settled({"val_loss": 4.0, "continued": {1: 3.95}})[1]


def test_late_fall_reads_the_last_quarter_of_the_curve():
    curve = {"step": [100, 200, 300, 400], "loss": [5.0, 4.0, 3.0, 2.985]}
    assert repro.late_fall(curve) == pytest.approx(0.005)


def test_gpu_plan_recipes_load_and_the_script_runs_them_all(tmp_path):
    from mom_ds.config import load_run_config

    proc = run_python([str(REPO / "bench" / "repro.py"), "--plan", "gpt2-small", "--out",
                       str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = tmp_path / "plan"
    recipes = sorted(plan.rglob("*.yaml"))
    # the teacher; per seed the arms + modular, the Llama pair on the first 2 seeds only
    assert len(recipes) == 1 + 3 * (len(ARMS) + 1) - 2
    assert not list(plan.glob("seed-3/llama*")) and len(list(plan.glob("seed-2/llama*"))) == 2
    script = (plan / "run.sh").read_text().splitlines()
    for path in recipes:
        cfg = load_run_config(path)  # validated as mom-train would
        launch = [line for line in script
                  if line.startswith("deepspeed") and f"--config {path}" in line]
        assert len(launch) == 1, path
        if path.stem != "modular":
            assert cfg.model.d_model == 768 and cfg.data.seq_len == 1024
    # a seed's donor is exported after it trains and before any arm is cut from it
    runs = "runs/repro-gpt2-small/seed-2"

    def first(*words: str) -> int:
        return min(i for i, line in enumerate(script) if all(w in line for w in words))

    assert first("deepspeed", "seed-2/donor.yaml") < first("to-hf", runs) < first("from-hf", runs)
    assert script[first("from-hf", runs)].endswith("--seed 2")  # the seed's routers
    donor = load_run_config(plan / "seed-1" / "donor.yaml")
    tokens = donor.train.max_steps * 16 * 4 * 8 * 1024
    assert 2.4e9 < tokens < 2.6e9 and donor.train.seed == donor.data.seed == 1
    # stage 2 draws other windows than its donor; the teacher yet others
    deep = load_run_config(plan / "seed-3" / "mom_deep.yaml")
    assert deep.train.seed == 3 and deep.data.seed == repro_arms.STAGE2_DATA_SEED + 3
    assert load_run_config(plan / "teacher.yaml").data.seed == repro_arms.TEACHER_DATA_SEED
    assert "hours" in (plan / "plan.md").read_text()


def test_tasks_run_two_at_a_time_after_what_they_need_and_a_failure_is_raised():
    import threading
    import time

    log, lock, running, peak = [], threading.Lock(), [0], [0]

    def work(name, fail=False):
        def run():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                log.append(("start", name))
            time.sleep(0.05)
            with lock:
                running[0] -= 1
                log.append(("end", name))
            if fail:
                raise RuntimeError(f"{name} failed")
        return run

    def task(name, after=(), fail=False):
        return repro.Task(name, 1.0, work(name, fail), frozenset(after))

    tasks = [task("a"), task("b", ["a"]), task("c"), task("d", ["b", "c"])]
    repro.run_tasks(tasks, 2)
    position = {event: i for i, event in enumerate(log)}
    assert position[("end", "a")] < position[("start", "b")]
    assert max(position[("end", "b")], position[("end", "c")]) < position[("start", "d")]
    assert peak[0] == 2
    log.clear()
    with pytest.raises(RuntimeError, match="x failed"):
        repro.run_tasks([task("x", fail=True), task("y", ["x"])], 2)
    assert ("start", "y") not in log


def test_scored_windows_spread_and_never_meet_the_search_windows(tmp_path):
    from data_prep.cli import main as mom_prep
    from mom_ds.data import TokenizedDataset

    docs = [{"text": f"document {i} " + "some words here " * 40} for i in range(60)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert mom_prep(["--source", str(tmp_path / "c.jsonl"), "--tokenizer", "bytes",
                     "--val-fraction", "0.5", "--out", str(tmp_path / "data"), "--quiet"]) == 0
    s = repro.settings_for(repro.parse_args(["--quick"]))
    val = TokenizedDataset(tmp_path / "data", split="val", seq_len=repro.SEQ)
    windows = repro.scored_windows(tmp_path / "data", s)
    scored = [i for b in windows.batches for i in b]
    rows = windows.source
    last = torch.from_numpy(val.windows([len(val) - s.search_windows - 1]).astype("int64"))
    assert torch.equal(rows[0], torch.from_numpy(val.windows([0]).astype("int64"))[0])
    assert torch.equal(rows[-1], last[0])  # the first and the last before the search rows
    assert len(scored) == s.eval_windows
    # the unigram perplexity, by hand: add-one counts of the train split
    train = np.fromfile(tmp_path / "data" / "train.bin", dtype="<u2")
    counts = np.bincount(train, minlength=257) + 1.0
    targets = rows[:, 1:].reshape(-1).numpy()
    expected = np.exp(-np.mean(np.log(counts[targets] / counts.sum())))
    assert repro.unigram_ppl(tmp_path / "data", windows) == pytest.approx(expected)


def test_bad_data_directory_is_one_error(tmp_path):
    proc = run_python([str(REPO / "bench" / "repro.py"), "--quick", "--data",
                       str(tmp_path / "missing"), "--out", str(tmp_path / "out")], timeout=120)
    assert proc.returncode == 1
    assert "--data" in proc.stderr and "Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
