"""Mixture-of-Depths against the mechanism of the paper, and the re-implementation bugs
listed in mom-spec.md section 2 (first-k gathering, double residual, re-indexed positions)."""
import torch

from mom_ds.model import presets
from mom_ds.model.mod_block import MoDBlock

CFG = presets.mixture_of_depths(2, capacity=0.25, vocab_size=32, n_positions=16, d_model=16,
                                n_heads=2)


def _block(seed=0):
    torch.manual_seed(seed)
    block = MoDBlock(CFG).eval()
    with torch.no_grad():
        block.router.weight.normal_(0, 1.0)
    return block


def test_mod_processes_exactly_the_top_k_tokens_in_causal_order():
    block = _block()
    x = torch.randn(3, 12, 16)
    with torch.no_grad():
        out, routing = block(x)
        r = x @ block.router.weight[0]  # (B, T) scores, computed here independently
        k = 3  # ceil(0.25 * 12)
        for b in range(3):
            ranked = sorted(range(12), key=lambda t: -float(r[b, t]))[:k]
            chosen = sorted(ranked)
            assert routing.selected[b].nonzero().flatten().tolist() == chosen
            # the layer sees the chosen tokens alone, in their original order
            sub = x[b, chosen][None]
            delta = block.layer(sub)[0] - sub[0]
            expected = x[b].clone()
            for j, t in enumerate(chosen):
                expected[t] = x[b, t] + r[b, t] * delta[j]  # residual added once
            torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)


def test_mod_does_not_take_the_first_k_tokens():
    block = _block()
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        w = block.router.weight[0]
        x[0, -3:] += 10 * w / w.norm()  # the last tokens have the highest scores
        _, routing = block(x)
    assert routing.selected[0].nonzero().flatten().tolist() == [9, 10, 11]


def test_mod_at_full_capacity_is_the_vanilla_layer_scaled_by_the_router():
    block = _block()
    block.capacity = 1.0
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        out, routing = block(x)
        r = (x @ block.router.weight[0]).unsqueeze(-1)
        torch.testing.assert_close(out, x + r * (block.layer(x) - x), atol=1e-5, rtol=1e-5)
    assert bool(routing.selected.all())


def test_mod_router_is_on_the_lm_gradient_path_and_bce_targets_membership():
    block = _block().train()
    x = torch.randn(2, 8, 16)
    out, routing = block(x)
    out.sum().backward(retain_graph=True)
    assert block.router.weight.grad.abs().sum() > 0
    r = (x @ block.router.weight[0]).detach()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(r, routing.selected.float())
    torch.testing.assert_close(routing.mod_router_loss.detach(), expected)
