"""What a resume does with each config field that differs from the checkpoint's: one rule
per field, in RULES (a section's rule, and the fields that have another). The README's
table "Changing the config on resume" is `rules_markdown()` (a test keeps it equal)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, RunConfig, _section_classes
from .run_data import ALLOW_FLAG, differences


@dataclass(frozen=True)
class Rule:
    name: str
    meaning: str


MODEL = Rule("refused", "another model: shape-compatible changes (depth, top_k, ...) would "
                        "load the weights into a different network without an error")
ORDER = Rule("refused", "the saved data position counts windows of this order; another value "
                        "makes it point at other windows")
DATA = Rule("compared", "the data's content (tokenizer, sizes, checksums): other data is "
                        f"refused unless {ALLOW_FLAG}, which is logged here")
PLACE = Rule("applied", "a place: the run or its inputs may move; what they hold is checked "
                        "by the fingerprints")
APPLY = Rule("applied", "from the resume step on, said in one line")
STEPS = Rule("applied", "from the resume step on, said in one line; at or below the "
                        "checkpoint's step refused")
START = Rule("ignored", "used at a fresh start only (the weights come from the checkpoint)")

RULES: dict[str, Rule] = {
    "model": MODEL,
    "data": ORDER,
    "data.data_dir": PLACE,
    "data.fingerprint": DATA,
    "train": APPLY,
    "train.out_dir": PLACE,
    "train.max_steps": STEPS,
    "train.init_from": START,
    "parallel": APPLY,
    "modular": APPLY,
    "modular.teacher": PLACE,
    "modular.teacher_fingerprint": MODEL,
    "modular.granularities": MODEL,
}


def rule_for(section: str, name: str) -> Rule:
    return RULES.get(f"{section}.{name}", RULES[section])


def fields() -> list[tuple[str, str]]:
    return [(section, f.name) for section, klass in _section_classes().items()
            for f in dataclasses.fields(klass)]


def rules_markdown() -> str:
    """The README table: each rule with the sections and fields it covers."""
    by_rule: dict[Rule, list[str]] = {}
    for key, rule in RULES.items():
        excepted = any(k.startswith(f"{key}.") for k in RULES)
        shown = f"`{key}`" if "." in key else \
            f"every {'other ' if excepted else ''}`{key}.*` field"
        by_rule.setdefault(rule, []).append(shown)
    lines = ["| on resume | fields | why |", "|---|---|---|"]
    lines += [f"| {rule.name} | {', '.join(shown)} | {rule.meaning} |"
              for rule, shown in by_rule.items()]
    return "\n".join(lines) + "\n"


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, dict) else "{...}"


def check_resume(run: RunConfig, saved: dict[str, Any], step: int, allow_data_change: bool
                 ) -> tuple[list[str], list[str]]:
    """(the applied changes, the warnings) of resuming `run` from a checkpoint of step `step`
    whose config was `saved`; ConfigError naming every refused change. Fields a checkpoint
    from an older mom-ds lacks are not compared (its data only warned about). An allowed data change is appended to
    run.data.fingerprint's allowed_changes, so the run keeps the record."""
    now = run.to_dict()
    refused, applied, warnings = [], [], []
    for section, name in fields():
        rule, key = rule_for(section, name), f"{section}.{name}"
        if name not in saved.get(section, {}) and rule is not DATA:
            continue
        old, new = saved.get(section, {}).get(name, {}), now[section][name]
        if rule is DATA:
            warnings += check_data_change(run, old, new, step, allow_data_change)
        elif old == new or rule in (PLACE, START):
            continue
        elif rule in (MODEL, ORDER):
            refused.append(f"{key} {_show(new)} (the checkpoint's: {_show(old)})")
        else:
            applied.append(f"{key} {_show(old)} -> {_show(new)}")
    if refused:
        raise ConfigError(f"--resume: {'; '.join(refused)}: a checkpoint continues with the "
                          f"model and data order it was trained with. Fix: resume with the "
                          f"run's values (its config.yaml), or start a new run in another "
                          f"--train.out_dir.")
    if run.train.max_steps <= step:
        raise ConfigError(f"--resume: train.max_steps {run.train.max_steps} <= the "
                          f"checkpoint's step {step}: nothing would be trained. Fix: "
                          f"--train.max_steps above {step} to train on (the schedule follows "
                          f"it from step {step + 1}).")
    return applied, warnings


def check_data_change(run: RunConfig, old: dict[str, Any], new: dict[str, Any], step: int,
                      allow: bool) -> list[str]:
    """The DATA rule: the warnings; ConfigError for a refused change."""
    if not old:
        return [f"the checkpoint records no data fingerprint (written before mom-ds kept "
                f"one): {run.data.data_dir} cannot be checked against the data it was trained "
                f"on"]
    found = differences(old, new)
    if not found:
        if old.get("allowed_changes"):  # the record goes on into the next checkpoints
            run.data.fingerprint["allowed_changes"] = list(old["allowed_changes"])
        return []
    said = "; ".join(found)
    if not allow:
        raise ConfigError(f"--resume: data.data_dir = {run.data.data_dir!r} is not the data "
                          f"the checkpoint was trained on: {said}. Fix: resume with the run's "
                          f"data (mom-prep it again with the settings in its meta.json), or "
                          f"pass {ALLOW_FLAG} to train on this data from step {step}.")
    run.data.fingerprint["allowed_changes"] = [*old.get("allowed_changes", []),
                                               f"from step {step}: {said}"]
    return [f"{ALLOW_FLAG}: training on other data from step {step}: {said}"]
