"""Llama-family import against transformers' own LlamaForCausalLM, Qwen2ForCausalLM and
MistralForCausalLM (tiny random configs saved with save_pretrained, no downloads): the
vanilla preset's logits, the two-stage map and upcycling from such a donor, and the configs
the family cannot express refused by name. Export round trips are in test_hf_export.py
(transformers 5) and test_hf_export_hf4.py (transformers 4.44)."""
from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaModel, MistralConfig,
                          MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from mom_ds import ConfigError, MoMConfig
from mom_ds.cli import convert
from mom_ds.model.hf import from_hf, hf_vanilla_model
from mom_ds.model.presets import moe, vanilla_routed
from mom_ds.model.weights_file import load_weights
from test_hf_export_hf4 import hf4_python  # noqa: F401  (the fixture: .venv-hf4, or a skip)

VOCAB, POS = 96, 64
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POS,
             rms_norm_eps=1e-6, rope_theta=1000.0, bos_token_id=0, eos_token_id=0)
# Llama (untied head, as TinyLlama), SmolLM (a tied Llama), Qwen2 (Q/K/V biases, tied),
# Mistral (a window no shorter than the positions never bites).
DONORS = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False)),
    "smollm": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True,
                                                   num_key_value_heads=1)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(tie_word_embeddings=False,
                                                         sliding_window=POS)),
}


def donor(kind: str = "llama", seed: int = 0, **overrides):
    model_class, config_class, extra = DONORS[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SHAPE, **extra, **overrides})).eval()
    # unit norms and zero biases would hide a swapped or dropped tensor: perturb them all
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(params=list(DONORS))
def saved(request, tmp_path):
    model = donor(request.param)
    model.save_pretrained(tmp_path / request.param)
    return request.param, model, tmp_path / request.param


def test_the_vanilla_preset_gives_transformers_logits(saved):
    kind, hf, directory = saved
    ours = from_hf(directory).eval()
    c = ours.config
    assert (c.block, c.n_bottom, c.kv_heads, c.ffn_width, c.rope_theta, c.qkv_bias) == \
        ("llama", 3, hf.config.num_key_value_heads, 48, 1000.0, kind == "qwen2")
    assert c.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    new = ours.generate(ids[:, :6], 10, temperature=0)
    assert torch.equal(new, hf.generate(ids[:, :6], max_new_tokens=10, do_sample=False,
                                        pad_token_id=0))
    # and back: the same tensors in the family's transformers model
    back = hf_vanilla_model(ours)
    assert type(back).__name__ == ("Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM")
    theirs = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_the_two_stage_map_places_each_donor_layer_in_a_module():
    """vanilla_routed (one block, module h at step h) computes exactly the vanilla stack: the
    two-stage map from a Llama donor then gives the donor's logits."""
    hf = donor("qwen2")
    layout = vanilla_routed(3, vocab_size=VOCAB, n_positions=POS, d_model=32, n_heads=4,
                            n_kv_heads=2, ffn_hidden=48, block="llama", rope_theta=1000.0,
                            qkv_bias=True, layer_norm_eps=1e-6)
    ours = from_hf(hf, layout=layout).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    q = hf.state_dict()["model.layers.2.self_attn.q_proj.weight"]
    assert torch.equal(ours.chunks[0].attn_pool.qkv.weight[2].t()[:32], q)


def test_a_top1_upcycled_moe_equals_its_dense_donor():
    """Sparse upcycling (Komatsuzaki et al. 2022): every expert a copy of the donor layer's
    FFN, routers fresh. With weights of exactly 1 (top-1, renormalised), whichever expert a
    token picks computes the donor's FFN: the logits are the donor's."""
    hf = donor("llama")
    layout = moe(3, n_experts=4, top_k=1, weighting="renorm", vocab_size=VOCAB,
                 n_positions=POS, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                 block="llama", rope_theta=1000.0, layer_norm_eps=1e-6,
                 tie_word_embeddings=False)
    ours = from_hf(hf, layout=layout).eval()
    with torch.no_grad():  # routers that spread the tokens over the experts
        for block in ours.chunks:
            block.ffn_router.head.weight.normal_(0, 1.0)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        out = ours(ids)
        torch.testing.assert_close(out.logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert all(int((r.ffn_counts[0, :4] > 0).sum()) > 1 for r in out.routing.blocks)
    tensors = ours.per_module_tensors()
    gate = hf.state_dict()["model.layers.1.mlp.gate_proj.weight"]
    for j in range(4):
        assert torch.equal(tensors[f"chunks.1.ffn_modules.{j}.fc.weight"][:48], gate)


def test_pools_larger_than_the_donor_are_filled_with_copies():
    """A MoM block of 4 + 4 modules from 2 donor layers: module j is layer j mod 2."""
    hf = donor("llama", num_hidden_layers=3)
    layout = MoMConfig(block="llama", vocab_size=VOCAB, n_positions=POS, d_model=32, n_heads=4,
                       n_kv_heads=2, ffn_hidden=48, rope_theta=1000.0, layer_norm_eps=1e-6,
                       tie_word_embeddings=False, n_bottom=1, n_routed_blocks=1,
                       n_attn_modules=4, n_ffn_modules=4, depth=2)
    tensors = from_hf(hf, layout=layout).per_module_tensors()
    state = hf.state_dict()
    for j in range(4):
        layer = 1 + j % 2
        assert torch.equal(tensors[f"chunks.0.attn_modules.{j}.proj.weight"],
                           state[f"model.layers.{layer}.self_attn.o_proj.weight"])
        assert torch.equal(tensors[f"chunks.0.ffn_modules.{j}.proj.weight"],
                           state[f"model.layers.{layer}.mlp.down_proj.weight"])
    assert torch.equal(tensors["lm_head.weight"], state["lm_head.weight"])


def test_mom_convert_from_hf_reads_a_llama_directory(tmp_path):
    hf = donor("llama")
    hf.save_pretrained(tmp_path / "llama")
    out = tmp_path / "llama.safetensors"
    assert convert.main(["from-hf", str(tmp_path / "llama"), str(out)]) == 0
    saved = load_weights(out, "test")
    assert saved.model_config["block"] == "llama"
    for name, tensor in from_hf(hf).state_dict().items():
        assert torch.equal(saved.state_dict[name], tensor), name


# --- refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, overrides, field", [
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope"),
    ("llama", dict(head_dim=16), "head_dim"),
    ("llama", dict(attention_bias=True), "attention_bias"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("llama", dict(hidden_act="gelu"), "hidden_act"),
    ("mistral", dict(sliding_window=16), "sliding_window"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0),
     "use_sliding_window|layer_types"),
])
def test_a_config_the_family_cannot_express_is_refused_by_name(kind, overrides, field, tmp_path):
    model_class, config_class, extra = DONORS[kind]
    config = config_class(**{**SHAPE, **extra, **overrides})
    config.save_pretrained(tmp_path)  # the config alone: refused before any weight is read
    with pytest.raises(ConfigError, match=f"the donor's ({field})\\w* = .*Fix: "):
        from_hf(tmp_path)


def test_a_moe_donor_is_refused_naming_its_model_type():
    mixtral = MixtralForCausalLM(MixtralConfig(**{**SHAPE, "num_local_experts": 2}))
    with pytest.raises(ConfigError, match="model_type = 'mixtral' is not an architecture"):
        from_hf(mixtral)


def test_a_checkpoint_without_its_head_is_refused(tmp_path):
    """A LlamaModel (no lm_head) of an untied config: transformers would fill the head with
    random values; the import names the missing tensor instead."""
    config = LlamaConfig(**SHAPE, tie_word_embeddings=False)
    body = LlamaModel(config)
    body.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="lacks lm_head.weight.*Fix: pass a complete"):
        from_hf(tmp_path)


SAVE_UNDER_4 = """
import sys, torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
assert transformers.__version__.startswith("4."), transformers.__version__
torch.manual_seed(0)
config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     rope_theta=500.0, tie_word_embeddings=False)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
"""


def test_a_donor_saved_by_transformers_4_imports_with_its_theta(hf4_python, tmp_path):
    """4.x writes rope_theta at the top of config.json, 5.x inside rope_parameters: either
    is read (a default theta would rotate by other angles)."""
    import subprocess

    subprocess.run([hf4_python, "-c", SAVE_UNDER_4, str(tmp_path)], check=True, timeout=300)
    ours = from_hf(tmp_path).eval()
    assert ours.config.rope_theta == 500.0
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_an_export_without_a_tokenizer_names_no_token_ids():
    """LlamaConfig's own bos 1 / eos 2 would make generate() stop at whatever id 2 is."""
    from mom_ds.model.hf_export import hf_model_of

    hf = hf_model_of(from_hf(donor("llama")))
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (None, None)
    assert hf.generation_config.eos_token_id is None


def test_a_layer_with_a_cache_needs_its_positions():
    layer = from_hf(donor("llama")).bottom[0]
    with pytest.raises(ValueError, match="needs the rotary tables"):
        layer(torch.randn(1, 3, 32), cache={})


def test_a_layout_larger_than_the_donor_says_so():
    layout = MoMConfig(block="llama", vocab_size=VOCAB, n_positions=POS, d_model=32, n_heads=4,
                       n_kv_heads=2, ffn_hidden=48, rope_theta=1000.0, layer_norm_eps=1e-6,
                       tie_word_embeddings=False, n_bottom=3, n_routed_blocks=1,
                       anchor_layers=True, depth=2)
    with pytest.raises(ConfigError, match=r"take 4 and the 0 left.*Fix: .*leave 0 of the "
                                          r"donor's layers for 1 routed block"):
        from_hf(donor("llama"), layout=layout)
