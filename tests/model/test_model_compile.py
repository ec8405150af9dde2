"""At E = 1 the whole model, routed blocks included, compiles into one graph
(torch.compile(fullgraph=True): no graph break, so no host sync or data-dependent shape
hides in it), and the compiled losses and gradients follow eager for a few optimizer steps.
The aot_eager backend traces forward and backward as inductor does (dynamo, fake tensors,
AOT autograd) without generating code, which keeps the test fast on a CPU."""
import copy

import pytest
import torch

from mom_ds import MoMForCausalLM
from mom_ds.model import presets

SHAPE = dict(vocab_size=64, n_positions=32, d_model=32, n_heads=4, router_width=16)

CASES = {
    "K1": (presets.mom(n_routed_blocks=1, n_attn_modules=4, n_ffn_modules=4, depth=2, top_k=1,
                       n_bottom=1, **SHAPE), "none"),
    "K2_capacity_mask": (presets.mom(n_routed_blocks=2, depth=2, top_k=2, capacity_factor=1.0,
                                     skip_in_attention="mask", **SHAPE), "none"),
    "early_exit": (presets.early_exit(3, **SHAPE), "none"),
    "mod": (presets.mixture_of_depths(4, **SHAPE), "none"),
    "moe": (presets.moe(2, n_experts=4, top_k=2, **SHAPE), "none"),
    "K2_checkpointed": (presets.mom(n_routed_blocks=1, depth=2, top_k=2, **SHAPE), "layer"),
    "llama_K2": (presets.mom(n_routed_blocks=1, n_bottom=1, depth=2, top_k=2, block="llama",
                             n_kv_heads=2, qkv_bias=True, **SHAPE), "none"),
    "llama_mod": (presets.mixture_of_depths(4, block="llama", n_kv_heads=2, **SHAPE), "none"),
}


@pytest.mark.parametrize("name", CASES)
def test_fullgraph_compile_follows_eager(name):
    config, checkpointing = CASES[name]
    torch._dynamo.reset()  # each model traced afresh, as in its own process
    torch.manual_seed(0)
    eager = MoMForCausalLM(config)
    with torch.no_grad():  # routers that tell tokens apart, so SKIP and the capacity bite
        for n, p in eager.named_parameters():
            if "router" in n and n.endswith("weight"):
                p.normal_(0, 0.5)
    eager.set_activation_checkpointing(checkpointing)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, twin)]
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 16))
        want, got = eager(ids, labels=ids), compiled(ids, labels=ids)
        want.loss.backward()
        got.loss.backward()
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
        for (n, a), b in zip(eager.named_parameters(), twin.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=n)
        for a, b in zip(want.routing.blocks, got.routing.blocks):
            assert all(torch.equal(x, y.to(x.dtype)) for x, y in zip(a.tensors()[:3], b.tensors()[:3]))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
