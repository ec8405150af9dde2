"""Every recipe under configs/ trains, the preset files included: each one shrunk to a
tiny width (the same overrides for all) and run for two steps through mom-train, all in one
process so the start-up is paid once."""
from __future__ import annotations

import json

import pytest

from mom_ds.config import ConfigError, load_run_config
from mom_ds.model import presets
from mom_ds_testing.runs import REPO, metrics, run_python, write_byte_data

RECIPES = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "presets").glob("*.yaml"))
SHRINK = ["--model.vocab_size", "257", "--model.n_positions", "32", "--model.d_model", "16",
          "--model.n_heads", "2", "--model.router_width", "8", "--data.seq_len", "32",
          "--train.max_steps", "2", "--train.warmup_steps", "1", "--train.micro_batch_size", "2",
          "--train.grad_accum_steps", "1", "--train.log_interval", "1", "--train.eval_interval",
          "2", "--train.eval_batches", "1", "--train.ckpt_interval", "0", "--train.precision",
          "fp32"]
# a Llama-family recipe's grouped-query and SwiGLU widths, shrunk with the rest
SHRINK_LLAMA = ["--model.n_kv_heads", "1", "--model.ffn_hidden", "40"]
DRIVER = """
import json, sys
from mom_ds.cli.train import main
for args in json.load(open(sys.argv[1])):
    if main(args):
        sys.exit(f"mom-train {' '.join(args)} failed")
"""


def test_a_recipe_may_name_its_model_by_preset(tmp_path):
    shape = dict(vocab_size=64, n_positions=32, d_model=16, n_heads=2)
    path = tmp_path / "r.yaml"
    path.write_text("preset: moe\npreset_args: " + json.dumps({"n_layer": 2, "n_experts": 4,
                                                               "top_k": 2, **shape})
                    + "\nmodel: {balance_loss_coef: 0.05}\n")
    want = presets.moe(n_layer=2, n_experts=4, top_k=2, **shape)
    want.balance_loss_coef = 0.05
    assert load_run_config(path, ["--model.dropout", "0.1", "--data.seq_len", "32"]).model == \
        type(want)(**{**want.to_dict(), "dropout": 0.1})
    path.write_text("preset_args: {n_layer: 2}\n")
    with pytest.raises(ConfigError, match="preset_args but no preset"):
        load_run_config(path, ["--data.seq_len", "32"])
    path.write_text("preset: moe\npreset_args: {n_layers: 2}\n")
    with pytest.raises(ConfigError, match="preset 'moe': .*n_layers"):
        load_run_config(path, ["--data.seq_len", "32"])


@pytest.mark.slow
def test_every_recipe_under_configs_trains(tmp_path):
    data = write_byte_data(tmp_path / "data")
    plan, outs = [], {}
    teacher = tmp_path / "teacher"  # modular.yaml compresses a vanilla run
    plan.append(["--config", str(REPO / "configs" / "presets" / "vanilla.yaml"), *SHRINK,
                 "--data.data_dir", str(data), "--train.out_dir", str(teacher)])
    for recipe in RECIPES:
        outs[recipe] = tmp_path / "runs" / recipe.relative_to(REPO / "configs").with_suffix("")
        extra = ["--modular.teacher", str(teacher)] if recipe.stem == "modular" else []
        if load_run_config(recipe, []).model.block == "llama":
            extra += SHRINK_LLAMA
        plan.append(["--config", str(recipe), *SHRINK, *extra, "--data.data_dir", str(data),
                     "--train.out_dir", str(outs[recipe])])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = run_python(["-c", DRIVER, str(tmp_path / "plan.json")], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for recipe, out in outs.items():
        rows = metrics(out)
        assert "eval/loss" in rows[2], recipe
