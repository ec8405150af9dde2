"""Idle modules in a routed block get zero gradients, never None."""
import torch

from mom_ds import MoMConfig, MoMForCausalLM


def test_every_parameter_gets_a_gradient_even_when_a_module_is_never_chosen():
    cfg = MoMConfig(vocab_size=40, n_positions=16, d_model=16, n_heads=2, n_attn_modules=6,
                    n_ffn_modules=6, depth=1, top_k=1)
    model = MoMForCausalLM(cfg)
    ids = torch.randint(0, 40, (1, 3))  # 3 tokens cannot reach all 6 modules
    out = model(ids, labels=ids)
    out.loss.backward()
    assert int((out.routing.blocks[0].ffn_counts[0, :6] == 0).sum()) >= 3
    assert all(p.grad is not None for p in model.parameters())
