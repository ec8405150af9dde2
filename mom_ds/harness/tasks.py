"""The harness's tasks for mom-eval: hub tasks by name, task YAMLs from --include-path, and
the one task mom-ds ships, `mom_cloze`, built from the run's own val split so that the
harness path runs without the network.

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

_YAML = """\
# Written by mom-eval from {data_dir} (val split); rebuilt when missing.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


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


def write_local_task(directory: Path, data_dir: str, seq_len: int) -> Path:
    """mom_cloze's jsonl and YAML in `directory` (the include path); rewritten each time,
    each file through a temporary name."""
    directory.mkdir(parents=True, exist_ok=True)
    jsonl = directory / f"{LOCAL_TASK}.jsonl"
    lines = "".join(json.dumps(d) + "\n" for d in cloze_documents(data_dir, seq_len))
    _write(jsonl, lines)
    _write(directory / f"{LOCAL_TASK}.yaml",
           _YAML.format(task=LOCAL_TASK, jsonl=json.dumps(str(jsonl.resolve())),
                        data_dir=data_dir))
    return directory


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def task_manager(tasks: Sequence[str], include_paths: Sequence[Path]):
    """A TaskManager that knows `tasks`, or one error naming each unknown task and the known
    names closest to it. The harness's own tasks (14,000 names, about 15 s to index) are
    indexed only when a task is not found in the include paths."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    local = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if local is not None and all(t in local.all_tasks for t in tasks):
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
