"""A DeepSpeed JSON kept from the Hugging Face Trainer, with its "auto" values, is accepted:
each "auto" becomes the recipe's value (the numbers expected below are written out from the
Trainer's documented rules, not taken from mom-ds), and a concrete value that contradicts
the recipe is still refused with the error it always got."""
from __future__ import annotations

import json

import pytest

from mom_ds.config import ConfigError, load_run_config
from mom_ds.train.engine import build_ds_config
from mom_ds_testing.runs import REPO, TINY, metrics, mom_train, tiny_args, write_byte_data

# modelled on the ZeRO-3 example of transformers' DeepSpeed guide, its scheduler block left out
# (mom-train's schedule is the recipe's warmup + cosine)
TRAINER_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                          "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


@pytest.fixture(scope="module")
def run():
    # tiny.yaml: d_model 64, lr 3e-3; AdamW defaults beta 0.9 / 0.95, eps 1e-5, decay 0.1
    return load_run_config(TINY, ["--train.micro_batch_size", "4",
                                  "--train.grad_accum_steps", "2", "--train.grad_clip", "0.5"])


def test_auto_values_become_the_recipe(run):
    cfg = build_ds_config(run, TRAINER_ZERO3, world_size=2, device="cpu")
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"],
            cfg["train_batch_size"], cfg["gradient_clipping"]) == (4, 2, 16, 0.5)
    assert cfg["bf16"] == {"enabled": False}  # precision auto on a CPU: fp32
    assert cfg["fp16"]["enabled"] is False
    zero = cfg["zero_optimization"]
    # the Trainer: hidden^2, int(0.9 hidden^2), 10 hidden
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert zero["sub_group_size"] == 1e9 and cfg["steps_per_print"] == 2000  # kept as given
    assert cfg["optimizer"]["type"] == "AdamW"
    params = cfg["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["eps"], params["weight_decay"]) == \
        (3e-3, [0.9, 0.95], 1e-5, 0.1)
    assert "auto" not in json.dumps(cfg)


def test_auto_bf16_follows_the_recipe_precision(run):
    bf16 = load_run_config(TINY, ["--train.precision", "bf16"])
    assert build_ds_config(bf16, TRAINER_ZERO3, 1, "cpu")["bf16"]["enabled"] is True


@pytest.mark.parametrize("change, message", [
    # today's errors for a concrete value that contradicts the recipe, beside "auto"s
    ({"gradient_accumulation_steps": 4},
     "gradient_accumulation_steps = 4 but the run gives 2 (train.micro_batch_size 4 x "
     "train.grad_accum_steps 2 x world size 2). Fix: drop gradient_accumulation_steps"),
    ({"bf16": {"enabled": True}}, None),  # precision auto: the JSON's bf16 wins, as before
    ({"fp16": {"enabled": True}}, "enables fp16. Fix: use bf16"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": "auto"}}},
     "'optimizer' block (params.lr = 0.0001 but the recipe gives 0.003)"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}, "'optimizer' block (type 'Lamb')"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}},
     "has a 'scheduler' block. Fix: remove it; mom-train builds the warmup + cosine schedule"),
    # an "auto" the recipe has nothing for
    ({"zero_optimization": {"stage": "auto"}},
     'zero_optimization.stage = "auto", but mom-train has nothing in the recipe to fill it'),
])
def test_a_contradiction_is_still_refused(run, change, message):
    ds_json = {**TRAINER_ZERO3, **change}
    if message is None:
        assert build_ds_config(run, ds_json, 2, "cpu")["bf16"]["enabled"] is True
        return
    with pytest.raises(ConfigError) as err:
        build_ds_config(run, ds_json, world_size=2, device="cpu")
    assert message in str(err.value)


@pytest.mark.slow
def test_a_trainer_json_trains_as_the_shipped_one(tmp_path):
    """mom-train --deepspeed with the Trainer's ZeRO-2 JSON ("auto" everywhere it may be)
    trains the run ds_configs/zero2.json trains (one process: the buckets change no sum)."""
    data = write_byte_data(tmp_path / "data")
    trainer = {**{k: v for k, v in TRAINER_ZERO3.items() if k != "zero_optimization"},
               "zero_optimization": {"stage": 2, "overlap_comm": True,
                                     "reduce_bucket_size": "auto", "allgather_bucket_size": 2e8}}
    (tmp_path / "trainer.json").write_text(json.dumps(trainer))
    runs = {"trainer": tmp_path / "trainer.json", "shipped": REPO / "ds_configs" / "zero2.json"}
    for name, ds_json in runs.items():
        mom_train(*tiny_args(data, tmp_path / name, "--train.max_steps", "3",
                             "--train.eval_interval", "3", "--train.ckpt_interval", "0"),
                  "--deepspeed", str(ds_json))
    want, got = metrics(tmp_path / "shipped"), metrics(tmp_path / "trainer")
    for step in (1, 2, 3):
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=1e-6)
