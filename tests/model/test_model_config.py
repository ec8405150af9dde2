"""MoMConfig refuses impossible models at construction with one message naming the field
and the fix; presets and their YAML files agree."""
from pathlib import Path

import pytest
import yaml

from mom_ds import ConfigError, MoMConfig, MoMForCausalLM
from mom_ds.model import presets

REPO = Path(__file__).resolve().parents[2]

BAD = [
    (dict(d_model=30, n_heads=4), "model.n_heads", "divide"),
    (dict(top_k=6, n_attn_modules=4, n_ffn_modules=4), "model.top_k", "top_k <= 5"),
    (dict(router="fixed", depth=6, n_attn_modules=4, n_ffn_modules=4), "model.depth", "cycle"),
    (dict(router="fixed", top_k=2), "model.top_k", "top_k = 1"),
    (dict(router="lstm"), "model.router", "gru, mlp, fixed"),
    (dict(skip_in_attention="drop"), "model.skip_in_attention", "zero, mask"),
    (dict(weighting="softmax"), "model.weighting", "prob, renorm"),
    (dict(temperature=0.0), "model.temperature", "0.2"),
    (dict(dropout=1.0), "model.dropout", "[0, 1)"),
    (dict(early_exit=True, use_skip=False), "model.early_exit", "use_skip"),
    (dict(n_routed_blocks=0, n_bottom=0), "model.n_routed_blocks", "n_routed_blocks >= 1"),
    (dict(n_routed_blocks=0, n_bottom=1, mod_capacity=0.5), "model.mod_capacity", "n_bottom"),
    (dict(n_routed_blocks=0, n_bottom=2, mod_capacity=1.5), "model.mod_capacity", "0.125"),
    (dict(vocab_size=0), "model.vocab_size", ">= 1"),
    (dict(block="mamba"), "model.block", "gpt2, llama"),
    (dict(block="llama", n_heads=12, n_kv_heads=5), "model.n_kv_heads", "divisor of n_heads"),
    (dict(n_kv_heads=4), "model.n_kv_heads", "block = llama"),
    (dict(qkv_bias=True), "model.qkv_bias", "block gpt2"),
    (dict(block="llama", d_model=36, n_heads=4), "model.n_heads", "even"),
    (dict(block="llama", rope_theta=0.0), "model.rope_theta", "10000"),
    (dict(ffn_hidden=-1), "model.ffn_hidden", "0 (the default)"),
]


@pytest.mark.parametrize("values,field,fix", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_impossible_configs_are_refused_with_field_and_fix(values, field, fix):
    with pytest.raises(ConfigError) as err:
        MoMConfig(**values)
    message = str(err.value)
    assert message.startswith(field) and "Fix:" in message and fix in message


def test_unknown_field_and_missing_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown model config field"):
        MoMConfig.from_dict({"n_layers": 3})
    with pytest.raises(ConfigError, match="does not exist"):
        MoMConfig.from_yaml(tmp_path / "nope.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = presets.moe(4, n_experts=4, top_k=2, d_model=64, n_heads=4)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    assert MoMConfig.from_yaml(path) == cfg


PRESET_FILES = sorted((REPO / "configs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_yaml_files_equal_their_preset_functions(path):
    data = yaml.safe_load(path.read_text())
    built = presets.preset(data["preset"], **data.get("preset_args", {}))
    assert MoMConfig.from_dict(data["model"]) == built


def test_every_preset_has_a_yaml_file():
    assert {yaml.safe_load(p.read_text())["preset"] for p in PRESET_FILES} == \
        set(presets.PRESETS)


def test_models_build_for_every_preset_at_tiny_size():
    for name in presets.PRESETS:
        MoMForCausalLM(presets.preset(name, vocab_size=32, n_positions=8, d_model=16, n_heads=2))
