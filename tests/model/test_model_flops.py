"""FLOPs per token: nanoGPT's rule for the vanilla preset, executed modules for MoM."""
import pytest
import torch

from mom_ds import MoMForCausalLM
from mom_ds.model import presets
from mom_ds.model.flops import (attention_module_params, ffn_module_params, flops_per_token,
                                router_params)
from mom_ds.model.modules import AttentionModule, FFNModule
from mom_ds.model.routers import Router

SHAPE = dict(vocab_size=100, n_positions=64, d_model=32, n_heads=4)


def numel(module):
    return sum(p.numel() for p in module.parameters())


def test_vanilla_flops_equal_nanogpt_rule():
    cfg = presets.vanilla(3, **SHAPE)
    model = MoMForCausalLM(cfg)
    # nanoGPT estimate_mfu: N = params without the position table, L, H, Q = head dim, T
    N = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    L, H, Q, T = 3, 4, 8, 64
    assert flops_per_token(cfg, T) == 6 * N + 12 * L * H * Q * T


@pytest.mark.parametrize("tied", [True, False])
def test_llama_vanilla_flops_equal_nanogpt_rule(tied):
    """SwiGLU's three matrices and grouped-query attention's smaller K/V counted by the
    modules' own parameters; an untied head counts its matrix, not the input lookup."""
    cfg = presets.vanilla(3, **SHAPE, block="llama", n_kv_heads=2, tie_word_embeddings=tied)
    model = MoMForCausalLM(cfg)
    N = sum(p.numel() for p in model.parameters()) - (0 if tied else model.wte.weight.numel())
    L, H, Q, T = 3, 4, 8, 64
    assert flops_per_token(cfg, T) == 6 * N + 12 * L * H * Q * T


@pytest.mark.parametrize("block", [
    dict(block="gpt2"), dict(block="gpt2", ffn_hidden=48),
    dict(block="llama", n_kv_heads=2), dict(block="llama", qkv_bias=True, ffn_hidden=40)])
def test_parameter_counts_match_the_modules(block):
    cfg = presets.mom(**SHAPE, **block)
    assert attention_module_params(cfg) == numel(AttentionModule(cfg))
    assert ffn_module_params(cfg) == numel(FFNModule(cfg))
    assert router_params(cfg, "gru") == numel(Router(cfg, "gru", 4))
    assert router_params(cfg, "mlp") == numel(Router(cfg, "mlp", 4))


def test_mom_flops_count_the_modules_actually_run():
    cfg = presets.mom(n_routed_blocks=1, depth=2, top_k=1, **SHAPE)
    d, T = 32, 64
    base = 6 * (100 * d + 2 * d) + 6 * 2 * 2 * router_params(cfg, "gru") + 12 * 2 * d * T
    planned = base + 6 * 2 * (attention_module_params(cfg) + ffn_module_params(cfg))
    assert flops_per_token(cfg, T) == planned
    model = MoMForCausalLM(cfg)
    out = model(torch.randint(0, 100, (2, T)))
    r = out.routing.blocks[0]
    run_attn = float(r.attn_counts[:, :4].sum()) / (2 * T)
    run_ffn = float(r.ffn_counts[:, :4].sum()) / (2 * T)
    taken = base + 6 * (run_attn * attention_module_params(cfg) + run_ffn * ffn_module_params(cfg))
    assert abs(flops_per_token(cfg, T, out.routing) - taken) < 1e-6 * taken


def test_moe_flops_count_one_attention_and_k_experts_per_layer():
    """A fixed attention router sends each token to one module whatever top_k is: the MoE
    preset costs vanilla plus, per layer, one more FFN expert and the expert router."""
    moe, plain = presets.moe(2, n_experts=4, top_k=2, **SHAPE), presets.vanilla(2, **SHAPE)
    T = 64
    extra = 6 * 2 * (ffn_module_params(moe) + router_params(moe, "mlp"))
    expected = flops_per_token(plain, T) + extra
    assert flops_per_token(moe, T) == expected
    out = MoMForCausalLM(moe)(torch.randint(0, 100, (2, T)))
    assert abs(flops_per_token(moe, T, out.routing) - expected) < 1e-9 * expected
