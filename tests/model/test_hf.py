"""Hugging Face GPT-2 interop against transformers' own GPT2LMHeadModel (random tiny models,
no downloads). The expected placements are written out here from mom-spec's rule, not taken
from mom_ds.model.hf, so the tests check the map rather than restate it."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mom_ds import ConfigError, MoMConfig, MoMForCausalLM
from mom_ds.model.hf import LayerTarget, donor_layer_map, from_hf, hf_vanilla_model
from mom_ds.model.hf_export import to_hf

D, HEADS, VOCAB, POS = 64, 4, 100, 32
SHAPE = dict(d_model=D, n_heads=HEADS, vocab_size=VOCAB, n_positions=POS)

# HF tensor inside transformer.h.<i> -> (part, tensor inside the MoM module, Conv1D weight).
LAYER_TENSORS = {
    "ln_1.weight": ("attn", "ln.weight", False), "ln_1.bias": ("attn", "ln.bias", False),
    "attn.c_attn.weight": ("attn", "qkv.weight", True),
    "attn.c_attn.bias": ("attn", "qkv.bias", False),
    "attn.c_proj.weight": ("attn", "proj.weight", True),
    "attn.c_proj.bias": ("attn", "proj.bias", False),
    "ln_2.weight": ("ffn", "ln.weight", False), "ln_2.bias": ("ffn", "ln.bias", False),
    "mlp.c_fc.weight": ("ffn", "fc.weight", True), "mlp.c_fc.bias": ("ffn", "fc.bias", False),
    "mlp.c_proj.weight": ("ffn", "proj.weight", True),
    "mlp.c_proj.bias": ("ffn", "proj.bias", False),
}
GLOBAL_TENSORS = {"transformer.wte.weight": "wte.weight", "transformer.wpe.weight": "wpe.weight",
                  "transformer.ln_f.weight": "ln_f.weight", "transformer.ln_f.bias": "ln_f.bias"}


def tiny_gpt2(n_layer: int = 3, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=D, n_head=HEADS, vocab_size=VOCAB,
                        n_positions=POS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, **overrides)
    model = GPT2LMHeadModel(config).eval()
    # HF initialises LayerNorms to 1 and biases to 0: perturb every tensor so that a swapped
    # LayerNorm or a dropped bias changes the outputs and every tensor is distinguishable.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def expected_pairs(layer_targets: dict[int, tuple]) -> list[tuple[str, str, bool]]:
    """(HF name, MoM name, transposed) from {donor layer: (attn module, ffn module)}."""
    pairs = [(hf, mom, False) for hf, mom in GLOBAL_TENSORS.items()]
    for layer, modules in layer_targets.items():
        for hf, (part, inner, conv) in LAYER_TENSORS.items():
            module = modules[0] if part == "attn" else modules[1]
            if module is not None:
                pairs.append((f"transformer.h.{layer}.{hf}", f"{module}.{inner}", conv))
    return pairs


def vanilla_pairs(n_layer: int) -> list[tuple[str, str, bool]]:
    return expected_pairs({i: (f"bottom.{i}.attn", f"bottom.{i}.ffn") for i in range(n_layer)})


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


# --- vanilla preset --------------------------------------------------------------------
def test_vanilla_preset_matches_hf_logits_loss_and_gradients():
    hf = tiny_gpt2(n_layer=3)
    ours = from_hf(hf).eval()
    assert (ours.config.n_bottom, ours.config.n_routed_blocks) == (3, 0)
    ids = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(1))

    hf_out = hf(ids, labels=ids)
    our_out = ours(ids, labels=shifted_labels(ids))
    torch.testing.assert_close(our_out.logits, hf_out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_out.loss, hf_out.loss, atol=1e-6, rtol=0)

    hf_out.loss.backward()
    our_out.loss.backward()
    hf_params, our_params = dict(hf.named_parameters()), dict(ours.named_parameters())
    pairs = vanilla_pairs(3)
    assert {mom for _, mom, _ in pairs} == set(our_params), "every parameter is compared"
    for hf_name, mom_name, conv in pairs:
        hf_grad = hf_params[hf_name].grad
        torch.testing.assert_close(our_params[mom_name].grad, hf_grad.t() if conv else hf_grad,
                                   atol=1e-5, rtol=1e-4, msg=lambda m: f"{mom_name}: {m}")


def test_round_trip_through_directories_is_exact(tmp_path):
    hf = tiny_gpt2(n_layer=2)
    hf.save_pretrained(tmp_path / "donor")
    ours = from_hf(tmp_path / "donor")
    out = to_hf(ours, tmp_path / "export")

    assert out == tmp_path / "export"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["donor", "export"], "no temp dir left"
    back = GPT2LMHeadModel.from_pretrained(out)
    before, after = hf.state_dict(), back.state_dict()
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()


# --- two-stage map ---------------------------------------------------------------------
MOM_LAYOUT = dict(n_bottom=1, n_routed_blocks=2, n_attn_modules=3, n_ffn_modules=4, depth=3,
                  anchor_layers=True, n_top=1, router_width=16, **SHAPE)
# mom-spec: 1 bottom layer; each routed block takes max(A, F) = 4 layers (attention parts to
# modules 0..2, the 4th layer's attention is dropped; MLP parts to modules 0..3) then one
# anchor; the last layer is the top layer. 1 + 2 * (4 + 1) + 1 = 12.
EXPECTED_12 = {
    0: ("bottom.0.attn", "bottom.0.ffn"),
    1: ("chunks.0.attn_modules.0", "chunks.0.ffn_modules.0"),
    2: ("chunks.0.attn_modules.1", "chunks.0.ffn_modules.1"),
    3: ("chunks.0.attn_modules.2", "chunks.0.ffn_modules.2"),
    4: (None, "chunks.0.ffn_modules.3"),
    5: ("anchors.0.attn", "anchors.0.ffn"),
    6: ("chunks.1.attn_modules.0", "chunks.1.ffn_modules.0"),
    7: ("chunks.1.attn_modules.1", "chunks.1.ffn_modules.1"),
    8: ("chunks.1.attn_modules.2", "chunks.1.ffn_modules.2"),
    9: (None, "chunks.1.ffn_modules.3"),
    10: ("anchors.1.attn", "anchors.1.ffn"),
    11: ("top.0.attn", "top.0.ffn"),
}


def test_two_stage_map_of_a_12_layer_donor():
    layout = MoMConfig(**MOM_LAYOUT)
    assert donor_layer_map(12, layout) == [(i, LayerTarget(*EXPECTED_12[i])) for i in range(12)]


def test_two_stage_import_places_every_donor_tensor_and_keeps_routers_fresh():
    donor = tiny_gpt2(n_layer=12)
    layout = MoMConfig(**MOM_LAYOUT)
    torch.manual_seed(7)
    ours = from_hf(donor, layout=layout)
    torch.manual_seed(7)
    fresh = MoMForCausalLM(layout)  # same seed: what every parameter was before the copy

    hf_state, our_params = donor.state_dict(), ours.per_module_tensors()
    placed = set()
    for hf_name, mom_name, conv in expected_pairs(EXPECTED_12):
        want = hf_state[hf_name].t() if conv else hf_state[hf_name]
        assert torch.equal(our_params[mom_name], want), f"{hf_name} -> {mom_name}"
        placed.add(mom_name)

    unplaced = set(our_params) - placed
    assert unplaced and all("_router." in name for name in unplaced), sorted(unplaced)
    fresh_params = fresh.per_module_tensors()
    for name in unplaced:
        assert torch.equal(our_params[name], fresh_params[name]), f"{name} was overwritten"
    dropped = [hf_state[f"transformer.h.{i}.attn.c_attn.weight"].t() for i in (4, 9)]
    for qkv in dropped:  # the attention parts with no module are copied nowhere
        assert not any(p.shape == qkv.shape and torch.equal(p, qkv) for p in our_params.values())


def test_two_stage_import_into_mod_bottom_layers():
    donor = tiny_gpt2(n_layer=2)
    layout = MoMConfig(n_bottom=2, n_routed_blocks=0, mod_capacity=0.5, mod_every=2, **SHAPE)
    ours = from_hf(donor, layout=layout)
    qkv = donor.state_dict()["transformer.h.1.attn.c_attn.weight"].t()
    assert torch.equal(ours.bottom[1].layer.attn.qkv.weight, qkv)


# --- errors ------------------------------------------------------------------------------
def test_refuses_an_architecture_it_does_not_import(tmp_path):
    """A MoE donor (Mixtral) or another block (GPT-NeoX): one error naming model_type."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ConfigError, match="model_type = 'gpt_neox' is not an architecture "
                                          "mom-ds imports.*Fix: pass a checkpoint of one of: "
                                          "gpt2, llama, mistral, qwen2"):
        from_hf(neox)
    neox.save_pretrained(tmp_path / "neox")
    with pytest.raises(ConfigError, match="'gpt_neox' is not an architecture"):
        from_hf(tmp_path / "neox")


def test_refuses_another_activation():
    with pytest.raises(ConfigError, match="activation_function = 'relu'.*Fix"):
        from_hf(tiny_gpt2(n_layer=1, activation_function="relu"))


def test_imports_another_mlp_width_and_refuses_mis_shaped_weights():
    donor = tiny_gpt2(n_layer=1, n_inner=2 * D)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(from_hf(donor).eval()(ids).logits, donor(ids).logits)
    donor.config.n_inner = None  # the config now says 4 * n_embd, the weights 2 * n_embd
    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight has shape "
                                          r"\(64, 128\) but \(256, 64\) is expected"):
        from_hf(donor)


def test_refuses_a_layout_of_another_shape():
    layout = MoMConfig(**{**MOM_LAYOUT, "d_model": 32})
    with pytest.raises(ConfigError, match="layout model.d_model gives 32 but the donor's is "
                                          "64. Fix: set model.d_model = 64"):
        from_hf(tiny_gpt2(n_layer=12), layout=layout)


def test_refuses_a_layout_with_the_wrong_layer_count():
    layout = MoMConfig(**{**MOM_LAYOUT, "n_top": 2})
    with pytest.raises(ConfigError, match=r"donor has 12 layers; n_bottom \(1\) \+ n_top \(2\) "
                                          r"\+ anchors \(2\) take 5 and the 7 left must split "
                                          r"evenly into the 2 routed block\(s\), at least 1 and at most "
                                          r"max\(A, F\) = 4 each.*Fix: .* \(e\.g\. n_top = 1\)"):
        from_hf(tiny_gpt2(n_layer=12), layout=layout)


@pytest.mark.parametrize("layout", [
    dict(n_routed_blocks=1, n_attn_modules=2, n_ffn_modules=2, depth=2, router_width=16),
    dict(n_bottom=2, n_routed_blocks=0, mod_capacity=0.5),
], ids=["routed", "mod"])
def test_gpt2_refuses_a_mom_model(layout):
    model = MoMForCausalLM(MoMConfig(**layout, **SHAPE))
    with pytest.raises(ConfigError, match="holds a vanilla preset only.*Fix"):
        hf_vanilla_model(model)


def test_a_hub_name_that_cannot_be_had_is_one_error(monkeypatch):
    import socket

    from data_prep import hub

    with socket.socket() as sock:  # a port nothing listens on: the hub "cannot be reached"
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    hub.hub_unreachable.cache_clear()
    try:
        with pytest.raises(ConfigError, match=f"nosuchorg/nosuchmodel is neither a directory.*"
                                              f"the hub was not asked: 127.0.0.1:{port} cannot be reached"):
            from_hf("nosuchorg/nosuchmodel")
    finally:
        hub.hub_unreachable.cache_clear()
