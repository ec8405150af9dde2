"""One name per concept (docs/glossary.md): the renamed config keys keep working wherever a
config is read (a recipe with a deprecation line, an override with one, a stored config
silently), old and new key together are refused, and the old names stay out of mom_ds/."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from mom_ds.config import (RENAMED_KEYS, ConfigError, RunConfig, load_run_config,
                           parse_overrides, stored_model_config)
from mom_ds.model import MoMForCausalLM, presets
from mom_ds.model.routing import RoutingRecord
from mom_ds_testing.runs import REPO

# old key -> (a value other than the default, the new key)
OLD = {"n_chunks": 2, "aux_loss_coef": 0.05, "aux_loss_count_skip": False,
       "mod_aux_loss_coef": 0.02}
NEW = {old.partition(".")[2]: new.partition(".")[2] for old, new in RENAMED_KEYS.items()}
SHAPE = dict(vocab_size=64, n_positions=16, d_model=16, n_heads=2, router_width=8)


def _recipe(tmp_path: Path, model: dict, name: str = "recipe.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": {**SHAPE, **model}, "data": {"seq_len": 16},
                                    **sections}))
    return path


def test_the_table_names_model_keys_renamed():
    assert set(NEW) == set(OLD)
    fields = set(RunConfig().model.to_dict())
    assert set(NEW.values()) <= fields and not set(NEW) & fields


@pytest.mark.parametrize("old", sorted(OLD))
def test_a_recipe_with_an_old_key_loads_with_one_deprecation_line(old, tmp_path, capsys):
    value, new = OLD[old], NEW[old]
    with_old = load_run_config(_recipe(tmp_path, {old: value}, "old.yaml"))
    err = capsys.readouterr().err
    with_new = load_run_config(_recipe(tmp_path, {new: value}, "new.yaml"))
    assert with_old == with_new and getattr(with_old.model, new) == value
    lines = [line for line in err.splitlines() if "deprecated" in line]
    assert len(lines) == 1 and lines[0].startswith(
        f"model.{old} is deprecated: it is model.{new}"), err
    assert "deprecated" not in capsys.readouterr().err  # the new key: no line


def test_preset_args_with_an_old_key_load_with_a_deprecation_line(tmp_path, capsys):
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump({"preset": "mom", "preset_args": {"n_chunks": 2, **SHAPE},
                                    "data": {"seq_len": 16}}))
    run = load_run_config(path)
    assert run.model.n_routed_blocks == 2
    assert "model.n_chunks is deprecated: it is model.n_routed_blocks" in capsys.readouterr().err


@pytest.mark.parametrize("old", sorted(OLD))
def test_an_override_with_an_old_key_works_the_same(old, capsys):
    value, new = str(OLD[old]).lower(), NEW[old]
    with_old = load_run_config(None, [f"--model.{old}", value, "--model.vocab_size", "64"])
    err = capsys.readouterr().err
    with_new = load_run_config(None, [f"--model.{new}", value, "--model.vocab_size", "64"])
    assert with_old == with_new
    assert err.count("deprecated") == 1
    assert f"model.{old} is deprecated: it is model.{new}" in err
    assert parse_overrides([f"--model.{old}={value}"]) == parse_overrides([f"--model.{new}={value}"])


def test_old_and_new_key_together_are_refused_in_one_message(tmp_path):
    with pytest.raises(ConfigError, match=r"sets both model\.n_chunks \(deprecated\) and "
                                          r"model\.n_routed_blocks\. Fix: keep only "
                                          r"model\.n_routed_blocks"):
        load_run_config(_recipe(tmp_path, {"n_chunks": 2, "n_routed_blocks": 2}))
    for args in (["--model.n_chunks", "2", "--model.n_routed_blocks", "2"],
                 ["--model.n_routed_blocks", "2", "--model.n_chunks", "2"]):
        with pytest.raises(ConfigError, match=r"the command line sets both --model\.n_chunks "
                                              r"\(deprecated\) and --model\.n_routed_blocks"):
            parse_overrides(args)


def _old_names(values: dict) -> dict:
    """A config dict as an earlier version stored it: the model section under the old keys."""
    back = {new: old for old, new in NEW.items()}
    return {**values, "model": {back.get(k, k): v for k, v in values["model"].items()}}


def test_an_old_run_directory_loads_silently(tmp_path, capsys):
    from mom_ds.checkpoints.format import write_weights
    from mom_ds.checkpoints.loading import load_model

    run = RunConfig.of_model(presets.mom(n_routed_blocks=2, depth=2, **SHAPE))
    stored = _old_names(run.to_dict())
    assert "n_chunks" in stored["model"] and "aux_loss_coef" in stored["model"]
    assert RunConfig.from_dict(stored) == run
    # a run directory as an earlier mom-train wrote it: config.yaml and a checkpoint
    run_dir = tmp_path / "old_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    model = MoMForCausalLM(run.model)
    write_weights(run_dir / "ckpt", 3, {"config": stored, "step": 3},
                  {n: p.detach().float() for n, p in model.named_parameters()})
    loaded, back, client = load_model(run_dir)
    assert loaded.model == run.model and client["step"] == 3
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(back(ids).logits, model.eval()(ids).logits)
    # an exported model's or a weights file's model section
    assert stored_model_config(stored["model"]) == run.model
    assert capsys.readouterr().err == ""  # read silently: nobody can change a stored config


def test_a_routing_row_of_an_earlier_run_reads():
    model = MoMForCausalLM(presets.mom(n_routed_blocks=1, depth=2, **SHAPE))
    record = model(torch.randint(0, 64, (2, 8))).routing
    row = record.as_row(1)
    old = {**row, "blocks": [{{"path_length_hist": "depth_hist", "balance_loss": "aux_loss"}
                              .get(k, k): v for k, v in b.items()} for b in row["blocks"]]}
    assert "depth_hist" in old["blocks"][0]
    assert RoutingRecord.from_row(old).as_row(1) == row


# --- the old names stay out of mom_ds/ ---------------------------------------------------------
OLD_NAMES = re.compile(r"aux_loss|mean_depth|n_chunks|depth_hist")  # also in aux_loss_coef
# where an old name must stand: the table of renamed keys, and routing.jsonl's old keys
ALLOWED = {"mom_ds/config.py": 4, "mom_ds/model/routing.py": 1}


def old_name_uses(root: Path) -> dict[str, int]:
    """{file: lines naming an old name} under root/mom_ds, beyond ALLOWED's counts."""
    found = {}
    for path in sorted((root / "mom_ds").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        lines = sum(bool(OLD_NAMES.search(line)) for line in path.read_text().splitlines())
        if lines > ALLOWED.get(rel, 0):
            found[rel] = lines
    return found


def test_no_old_name_in_mom_ds_outside_the_rename_table():
    assert old_name_uses(REPO) == {}


def test_the_guard_finds_a_planted_old_name(tmp_path):
    import shutil

    shutil.copytree(REPO / "mom_ds", tmp_path / "mom_ds",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert old_name_uses(tmp_path) == {}
    planted = tmp_path / "mom_ds" / "model" / "routed_block.py"
    planted.write_text(planted.read_text() + "\nmean_depth = None\n")
    (tmp_path / "mom_ds" / "config.py").write_text(
        (tmp_path / "mom_ds" / "config.py").read_text() + "\n# out.aux_loss\n")
    assert old_name_uses(tmp_path) == {"mom_ds/config.py": 5,
                                      "mom_ds/model/routed_block.py": 1}
