"""RunConfig: YAML + typed overrides, validation, and the preflight errors mom-train gives
before DeepSpeed starts any process group (one clear message each, exit code 2)."""
from __future__ import annotations

import json

import pytest
import torch.distributed as dist
import yaml

from mom_ds.config import (ConfigError, field_docs, load_run_config,
                           parse_overrides, reference_markdown, TrainConfig)
from mom_ds.parallel.parallelize import parallelize
from mom_ds.train.engine import build_ds_config
from mom_ds.train.optimizer import lr_factor
from mom_ds_testing.runs import REPO, TINY


def test_yaml_and_overrides_are_typed():
    run = load_run_config(TINY, ["--train.lr", "3e-4", "--model.use_skip", "false",
                                 "--model.attn_router", "none", "--data.seq_len=32"])
    assert run.train.lr == 3e-4 and run.model.use_skip is False
    assert run.model.attn_router is None and run.data.seq_len == 32
    assert run.model.d_model == 64  # from the YAML
    assert isinstance(run.train.lr, float)


@pytest.mark.parametrize("args, message", [
    (["--train.lr", "fast"], "train.lr = 'fast': expected float"),
    (["--train.max_steps", "1.5"], "train.max_steps = '1.5': expected int"),
    (["--model.use_skip", "maybe"], "model.use_skip = 'maybe': expected bool"),
    (["--train.nope", "1"], "train has no field 'nope'"),
    (["--optim.lr", "1"], "unknown section 'optim'"),
    (["--train.lr"], "has no value"),
    (["--train.min_lr", "1.0"], "train.min_lr = 1.0: must lie in [0, train.lr"),
    (["--train.warmup_steps", "5000"], "exceeds train.max_steps"),
    (["--data.seq_len", "4096"], "model.n_positions = 128"),
    (["--train.precision", "fp8"], "train.precision = 'fp8'"),
    (["--model.n_heads", "5"], "model.n_heads = 5: does not divide d_model"),
])
def test_bad_values_name_the_field(args, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_run_config(TINY, args)
    assert message in str(err.value)


def test_unknown_yaml_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": 1e-3}}))
    with pytest.raises(ConfigError, match="unknown train field"):
        load_run_config(path)


def test_config_round_trips(tmp_path):
    run = load_run_config(TINY)
    run.save(tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == run


def test_every_field_is_documented():
    for klass in (TrainConfig,):
        docs = field_docs(klass)
        assert set(docs) == {f for f in klass.__dataclass_fields__}
    table = reference_markdown()
    assert "| `grad_accum_steps` |" in table and "| `deepspeed` |" in table


def test_overrides_parse_both_spellings():
    assert parse_overrides(["--train.lr=1e-3", "--data.seed", "7"]) == \
        {"train": {"lr": 1e-3}, "data": {"seed": 7}}


def test_ds_batch_size_filled_and_mismatch_refused():
    run = load_run_config(TINY, ["--train.micro_batch_size", "4",
                                 "--train.grad_accum_steps", "2"])
    cfg = build_ds_config(run, {"zero_optimization": {"stage": 2}}, world_size=2, device="cpu")
    assert cfg["train_batch_size"] == 16 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["optimizer"]["params"]["weight_decay"] == run.train.weight_decay
    assert cfg["bf16"]["enabled"] is False  # auto on CPU: fp32
    with pytest.raises(ConfigError, match="train_batch_size = 32 but the run gives 16"):
        build_ds_config(run, {"train_batch_size": 32}, world_size=2, device="cpu")
    with pytest.raises(ConfigError, match="'optimizer' block"):
        build_ds_config(run, {"optimizer": {"type": "Adam"}}, world_size=2, device="cpu")


def test_every_shipped_ds_config_is_accepted():
    run = load_run_config(TINY)
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        if json.loads(path.read_text()).get("bf16", {}).get("enabled"):
            continue  # bf16 configs are for GPUs; auto precision on CPU is fp32
        build_ds_config(run, json.loads(path.read_text()), world_size=2, device="cpu")


def test_weight_decay_groups():
    from mom_ds import MoMForCausalLM

    run = load_run_config(TINY)
    run.train.weight_decay = 0.1
    model = MoMForCausalLM(run.model)
    decay, no_decay = parallelize(model, run).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "wte.weight" not in decayed and "wpe.weight" not in decayed
    assert not any(n.endswith(("bias", "ln_weight")) or ".ln" in n for n in decayed)
    assert any(n.endswith("attn_pool.qkv.weight") for n in decayed)
    assert any(n.endswith("ffn_pool.fc.weight") for n in decayed)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule_warmup_then_cosine():
    t = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_factor(s, t) * t.lr for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_factor(100, t) * t.lr == pytest.approx(1e-4)


# --- preflight through mom-train itself: one message, exit 2, no process group -----------
def mom_train_error(monkeypatch, capsys, *args: str) -> str:
    """The error mom-train gives rank 0 of 2. One of several ranks keeps its start-up error
    until the ranks agree on it once the process group is up (test_launch_two_nodes.py runs
    that for real, the error on the other host); a lone test rank cannot start a group of
    2, so here the agreement is its own error, and nothing else of run_training runs."""
    from mom_ds.cli.train import main
    import mom_ds.train.session as session

    def agreed_alone(run, start, **_) -> None:
        assert start.result is None
        raise ConfigError(start.error)

    monkeypatch.setattr(session, "run_training", agreed_alone)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under the launcher: checked against the JSON
    monkeypatch.setenv("RANK", "0")
    assert main(["--config", str(TINY), *args]) == 2
    assert not dist.is_initialized()
    err = capsys.readouterr().err
    assert err.count("mom-train: error:") == 1
    return err


def test_missing_data_dir(monkeypatch, capsys, tmp_path):
    err = mom_train_error(monkeypatch, capsys, "--data.data_dir", str(tmp_path / "nowhere"))
    assert "does not exist" in err and "mom-prep --source builtin" in err


def test_data_vocab_larger_than_model(monkeypatch, capsys, data):
    err = mom_train_error(monkeypatch, capsys, "--data.data_dir", str(data),
                          "--model.vocab_size", "200")
    assert "vocabulary of 257 tokens but model.vocab_size = 200" in err


def test_ds_batch_mismatch_before_process_group(monkeypatch, capsys, data, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 1}}))
    err = mom_train_error(monkeypatch, capsys, "--data.data_dir", str(data),
                          "--deepspeed", str(ds))  # 8 per rank x 1 x 2 ranks = 16
    assert "train_batch_size = 8 but the run gives 16" in err


def test_bad_value_through_cli(monkeypatch, capsys):
    err = mom_train_error(monkeypatch, capsys, "--train.grad_clip", "-1")
    assert "train.grad_clip = -1.0: must not be negative" in err


def test_missing_deepspeed_json(monkeypatch, capsys, data):
    err = mom_train_error(monkeypatch, capsys, "--data.data_dir", str(data),
                          "--deepspeed", "ds_configs/zero9.json")
    assert "file not found" in err


def test_expert_parallel_size_that_does_not_divide_the_ranks_is_refused(monkeypatch, capsys,
                                                                        data):
    # tiny: A = F = 4 modules per pool, 2 ranks (WORLD_SIZE)
    err = mom_train_error(monkeypatch, capsys, "--data.data_dir", str(data),
                          "--parallel.expert_parallel_size", "4")
    assert "expert_parallel_size = 4 does not divide the data-parallel size 2" in err


def test_zero0_clipping_with_sharded_pools_is_refused(monkeypatch, capsys, data):
    err = mom_train_error(monkeypatch, capsys, "--data.data_dir", str(data),
                          "--parallel.expert_parallel_size", "2",
                          "--deepspeed", "ds_configs/zero0.json")
    assert "ZeRO stage 0 with parallel.expert_parallel_size 2" in err and "zero1.json" in err


def test_recipes_validate_and_their_size_lines_are_fresh():
    from mom_ds.recipes import main as recipes

    paths = sorted(str(p) for p in (REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 6
    for path in paths + sorted(str(p) for p in (REPO / "configs" / "presets").glob("*.yaml")):
        load_run_config(path)
    assert recipes(["--check", *paths]) == 0


def test_preset_files_are_fresh(tmp_path):
    """configs/presets/*.yaml are generated: each equals what the generator writes now."""
    from mom_ds.recipes import PRESETS_COMMAND, write_preset_files

    write_preset_files(str(tmp_path))
    written = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert written == sorted(p.name for p in (REPO / "configs" / "presets").glob("*.yaml"))
    for name in written:
        assert (tmp_path / name).read_text() == (REPO / "configs" / "presets" / name).read_text(), \
            f"configs/presets/{name} is stale: run {PRESETS_COMMAND}"


def test_one_rank_of_several_keeps_bad_input_for_the_agreement_and_raises_bugs():
    from mom_ds.errors import exit_code
    from mom_ds.train.preflight import StartCheck

    def bad_input():
        raise ConfigError("data.data_dir = '/x' does not exist")

    def bug():
        raise ZeroDivisionError("a bug")

    def bad(err):
        return exit_code(err) == 2

    assert StartCheck.of(bad_input, bad, 2).error == "data.data_dir = '/x' does not exist"
    assert StartCheck.of(lambda: {"ok": 1}, bad, 2).result == {"ok": 1}
    with pytest.raises(ConfigError):  # alone: at once, before any process group
        StartCheck.of(bad_input, bad, 1)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback on every rank
        StartCheck.of(bug, bad, 2)


def test_srun_without_rank_variables_is_refused(monkeypatch, capsys):
    from mom_ds.cli.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert main(["--config", str(TINY)]) == 2
    assert "each task would train alone" in capsys.readouterr().err
    assert not dist.is_initialized()
