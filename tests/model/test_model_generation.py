"""Cached decoding equals full recomputation for every preset; sampling controls."""
import pytest
import torch

from mom_ds import MoMForCausalLM
from mom_ds.model import presets
from mom_ds.model.model import sample_next

SHAPE = dict(vocab_size=64, n_positions=32, d_model=32, n_heads=4)

CASES = {
    "vanilla": presets.vanilla(3, **SHAPE),
    "vanilla_routed": presets.vanilla_routed(3, **SHAPE),
    "shared_layers": presets.shared_layers(3, **SHAPE),
    "mom_skip_zero": presets.mom(n_routed_blocks=2, n_bottom=1, n_top=1, anchor_layers=True, top_k=2,
                                 skip_in_attention="zero", temperature=1.0, **SHAPE),
    "mom_skip_mask": presets.mom(n_routed_blocks=1, n_attn_modules=3, depth=3, skip_in_attention="mask",
                                 temperature=1.0, **SHAPE),
    "mom_mlp_k1": presets.mom(router="mlp", **SHAPE),
    "moe": presets.moe(2, n_experts=4, top_k=2, **SHAPE),
    "early_exit": presets.early_exit(3, **SHAPE),
    "mod_bce": presets.mixture_of_depths(4, capacity=0.5, **SHAPE),
    "mod_predictor": presets.mixture_of_depths(4, capacity=0.5, decode="predictor", **SHAPE),
}
# Every preset again in the llama block family: rotary positions (the cache holds rotated
# keys), grouped-query attention, SwiGLU, RMSNorm, an untied head; Q/K/V biases in one.
LLAMA = dict(SHAPE, block="llama", n_kv_heads=2, tie_word_embeddings=False)
CASES.update({
    "llama_vanilla": presets.vanilla(3, **LLAMA),
    "llama_vanilla_routed": presets.vanilla_routed(3, **LLAMA),
    "llama_shared_layers": presets.shared_layers(3, **LLAMA),
    "llama_mom_skip_zero": presets.mom(n_routed_blocks=2, n_bottom=1, n_top=1, anchor_layers=True,
                                       top_k=2, temperature=1.0, qkv_bias=True, **LLAMA),
    "llama_mom_skip_mask": presets.mom(n_routed_blocks=1, n_attn_modules=3, depth=3,
                                       skip_in_attention="mask", temperature=1.0, **LLAMA),
    "llama_moe": presets.moe(2, n_experts=4, top_k=2, **LLAMA),
    "llama_early_exit": presets.early_exit(3, **LLAMA),
    "llama_mod": presets.mixture_of_depths(4, capacity=0.5, **LLAMA),
})


def _perturb_(model):
    """Random weights large enough that routers really pick SKIP / different modules and
    MoD routers select some tokens and not others."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or "predictor" in name:
                # weight, and the GRU's weight_ih / weight_hh: random; biases zero
                p.normal_(0, 0.5) if name.rsplit(".", 1)[-1].startswith("weight") \
                    else p.zero_()


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decoding_equals_full_recomputation(name):
    torch.manual_seed(0)
    model = MoMForCausalLM(CASES[name]).eval()
    _perturb_(model)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids, mod_routing="threshold")
        cache = {}
        steps = [model(ids[:, :5], cache=cache, mod_routing="threshold").logits]
        for t in range(5, 12):
            steps.append(model(ids[:, t:t + 1], cache=cache, mod_routing="threshold").logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, atol=1e-5, rtol=1e-5)
    if full.routing.blocks:  # the routing really used SKIP somewhere, or several modules
        counts = torch.cat([r.attn_counts for r in full.routing.blocks] +
                           [r.ffn_counts for r in full.routing.blocks], dim=1)
        assert int((counts > 0).sum()) > 1
    if full.mod_routing:
        sel = torch.stack([m.selected for m in full.mod_routing])
        assert bool(sel.any()) and not bool(sel.all())


def test_generate_with_cache_equals_without():
    torch.manual_seed(1)
    model = MoMForCausalLM(CASES["mom_skip_mask"])
    _perturb_(model)
    prompt = torch.randint(0, 64, (2, 4))
    a = model.generate(prompt, 8, temperature=0, use_cache=True)
    b = model.generate(prompt, 8, temperature=0, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 12) and torch.equal(a[:, :4], prompt)


def test_generate_stops_at_eos_and_pads_finished_rows():
    torch.manual_seed(2)
    model = MoMForCausalLM(CASES["vanilla"])
    prompt = torch.randint(0, 64, (3, 2))
    greedy = model.generate(prompt, 6, temperature=0)
    eos = int(greedy[0, 3])  # the second token row 0 generates greedily
    out = model.generate(prompt, 6, temperature=0, eos_token_id=eos)
    assert int(out[0, 3]) == eos and bool((out[0, 3:] == eos).all())


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    assert int(sample_next(logits, 0.0, None, None, gen)) == 1
    assert {int(sample_next(logits, 1.0, 1, None, gen)) for _ in range(20)} == {1}
    assert {int(sample_next(logits, 1.0, 2, None, gen)) for _ in range(200)} == {1, 2}
    # softmax = [.03, .64, .24, .09]: top_p 0.7 keeps {1, 2} (0.64 < 0.7 needs the next one)
    assert {int(sample_next(logits, 1.0, None, 0.7, gen)) for _ in range(200)} == {1, 2}
    assert {int(sample_next(logits, 1.0, None, 0.5, gen)) for _ in range(50)} == {1}
