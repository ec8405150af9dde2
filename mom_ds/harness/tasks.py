"""The harness's tasks for mom-eval: hub tasks by name, task YAMLs from --include-path, and
the one task mom-ds ships, `mom_cloze`, built from the run's own val split so that the
harness path runs without the network. Nothing under a run directory is handed to the
harness: a task YAML can run Python (`!function`), and a run directory may come from anyone.

mom_cloze: each document is a passage of the val split cut in two; the model chooses the
passage's true continuation among it and three continuations of other passages (4-way
multiple choice, accuracy; chance is 0.25). Contexts and continuations are whole tokens of
the split, decoded to text.
"""
from __future__ import annotations

import difflib
import json
import random
from pathlib import Path
from typing import Optional, Sequence

from ..model import ConfigError

LOCAL_TASK = "mom_cloze"
CONTEXT_TOKENS = 48
CONTINUATION_TOKENS = 8
CHOICES = 4
DOCUMENTS = 400
SEED = 1234


def _config(jsonl: Path) -> dict:
    """mom_cloze's harness config, handed to the harness as a dict (never a YAML on disk:
    a YAML is parsed with the harness's `!function` tag, which imports and runs Python)."""
    return {"task": LOCAL_TASK, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(jsonl)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "gold", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean",
                             "higher_is_better": True}],
            "metadata": {"version": 1.0}}


def cloze_documents(data_dir: str, seq_len: int) -> list[dict]:
    """The mom_cloze documents of a prepared directory's val split."""
    from ..data import TokenizedDataset, load_data_tokenizer

    span = CONTEXT_TOKENS + CONTINUATION_TOKENS
    if span > seq_len + 1:
        raise ConfigError(f"{LOCAL_TASK} needs windows of {span} tokens, but the run's "
                          f"data.seq_len is {seq_len}. Fix: use another task.")
    data = TokenizedDataset(data_dir, split="val", seq_len=seq_len)
    tokenizer = load_data_tokenizer(data_dir)
    count = min(DOCUMENTS, len(data))
    if count < CHOICES:
        raise ConfigError(f"{LOCAL_TASK}: the val split of {data_dir} holds {len(data)} "
                          f"window(s), fewer than the {CHOICES} choices. Fix: prepare more text.")
    rows = data.windows(list(range(count)))[:, :span]
    contexts = [tokenizer.decode(r[:CONTEXT_TOKENS]) for r in rows]
    endings = [tokenizer.decode(r[CONTEXT_TOKENS:]) for r in rows]
    draw = random.Random(SEED)
    documents = []
    for i in range(count):
        others = draw.sample([j for j in range(count) if j != i], CHOICES - 1)
        choices = [endings[j] for j in others]
        gold = draw.randrange(CHOICES)
        choices.insert(gold, endings[i])
        documents.append({"context": contexts[i], "choices": choices, "gold": gold})
    return documents


def local_task(directory: Path, data_dir: str, seq_len: int) -> dict:
    """mom_cloze's documents written to `directory/mom_cloze.jsonl`; its harness config.
    `directory` is a private temporary directory mom-eval creates: nothing under the run
    directory is read, so a file planted there can neither replace the task nor its data."""
    jsonl = directory / f"{LOCAL_TASK}.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in cloze_documents(data_dir, seq_len)))
    return _config(jsonl)


def task_manager(tasks: Sequence[str], include_paths: Sequence[Path]):
    """A TaskManager that knows `tasks` (mom_cloze aside: local_task builds it), or one error
    naming each unknown task and the known names closest to it. The harness's own tasks
    (14,000 names, about 15 s to index) are indexed only when a task is not found in the
    include paths, which are only those the user named (--include-path)."""
    from lm_eval.tasks import TaskManager

    tasks = [t for t in tasks if t != LOCAL_TASK]
    paths = [str(p) for p in include_paths]
    local = TaskManager(include_path=paths or None, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = "; ".join(f"{t!r}: close names {difflib.get_close_matches(t, manager.all_tasks, 5)}"
                          for t in unknown)
        raise ConfigError(f"--tasks: lm-evaluation-harness knows no task {hints}. Fix: use a "
                          f"name from `lm-eval ls tasks`, {LOCAL_TASK} (built from the run's "
                          f"val split), or a task YAML in --include-path.")
    return manager


def results_path(run_dir: Path, tasks: Sequence[str], step: int,
                 output: Optional[str]) -> Path:
    if output:
        return Path(output)
    return run_dir / "lm_eval" / f"step_{step:06d}_{'+'.join(tasks)}.json"
