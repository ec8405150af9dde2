"""The sorted dispatch (RoutePlan + LocalDispatcher + stacked pools on grouped GEMM) against
a naive per-token loop over plain per-module nn.Modules, forward and backward, with modules
that receive no token; torch's grouped_mm path and the per-module fallback alike."""
import pytest
import torch

from mom_ds.model import MoMConfig, pools
from mom_ds.model.dispatch import LocalDispatcher, make_plan
from mom_ds.model.pools import FFNPool, RowGroups, grouped_linear
from mom_ds_testing.pool_modules import _modules
from mom_ds.model.modules import FFNModule

# Modules 1 and 3 receive no token; ids 5 and 6 (>= pool) act as SKIP.
IDS = torch.tensor([[0, 2], [2, 4], [4, 5], [6, 0], [0, 0], [2, 6],
                    [4, 2], [5, 6], [0, 4], [2, 2], [6, 5], [4, 0]])


@pytest.fixture(params=["grouped_mm", "loop"])
def path(request, monkeypatch):
    use = request.param == "grouped_mm"  # torch's grouped_mm runs on the CPU too
    monkeypatch.setattr(pools, "grouped_mm_available", lambda x, w: use)
    return request.param


@pytest.mark.parametrize("block", ["gpt2", "llama"])
def test_sorted_dispatch_equals_per_token_loop_forward_and_backward(path, block):
    """Either block family: GPT-2's LayerNorm + GELU MLP with biases, Llama's RMSNorm +
    SwiGLU without (gate and up stacked in one projection)."""
    torch.manual_seed(0)
    n_modules, d, (N, K) = 5, 8, IDS.shape
    pool = FFNPool(MoMConfig(d_model=d, n_heads=1, block=block, ffn_hidden=12), n_modules)
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_(0, 0.3)
    mods = _modules(pool, FFNModule)
    weights = torch.rand(N, K, requires_grad=True)
    x = torch.randn(N, d, requires_grad=True)

    plan = make_plan(IDS, weights, n_modules)
    fast = LocalDispatcher().run(pool.normalize(x), plan, pool)
    fast.square().sum().backward()
    fast_dx, fast_dw = x.grad.clone(), weights.grad.clone()

    x.grad = weights.grad = None
    rows = []
    for t in range(N):
        acc = torch.zeros(d)
        for k in range(K):
            m = int(IDS[t, k])
            if m < n_modules:
                acc = acc + weights[t, k] * mods[m](x[t])
        rows.append(acc)
    slow = torch.stack(rows)
    slow.square().sum().backward()

    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fast_dx, x.grad)
    torch.testing.assert_close(fast_dw, weights.grad)
    views = pool.module_views("m")
    for j, mod in enumerate(mods):
        for name, p in mod.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            got = views[f"m.{j}.{name}"]
            projection, param = pool.view_names()[name]
            grad = getattr(getattr(pool, projection), param).grad[j]
            torch.testing.assert_close(grad.t() if grad.dim() == 2 else grad, expected,
                                       msg=f"module {j} {name}")
            assert got.shape == p.shape
    # Idle modules get zero gradients (the stack has one gradient tensor for all).
    assert all(float(pool.fc.weight.grad[m].abs().max()) == 0 for m in (1, 3))
    assert plan.counts.tolist() == [6, 0, 6, 0, 5, 7]
    assert plan.groups.offsets.tolist() == [6, 6, 12, 12, 17]
    assert plan.chosen.tolist() == [True] * 7 + [False] + [True] * 2 + [False, True]


def test_rows_past_the_last_offset_give_zero_and_pass_no_gradient(path):
    """torch leaves uninitialised memory there (forward and backward); the SKIP rows must
    come out 0 and send no gradient back to their tokens."""
    torch.manual_seed(1)
    weight = torch.randn(3, 8, 16, requires_grad=True)
    bias = torch.randn(3, 16, requires_grad=True)
    x = torch.randn(10, 8, requires_grad=True)
    module = torch.tensor([1, 1, 1, 1, 2, 2, 2, 3, 3, 3])  # group 0 empty, 3 rows in none
    groups = RowGroups.from_sorted(module, torch.tensor([0, 4, 3]))
    y = grouped_linear(x, weight, bias, groups)
    (y * torch.randn_like(y)).sum().backward(retain_graph=True)
    assert float(y.detach()[7:].abs().max()) == 0
    assert float(x.grad[7:].abs().max()) == 0
    assert float(weight.grad[0].abs().max()) == 0 and float(bias.grad[0].abs().max()) == 0
    with torch.no_grad():
        ref = torch.cat([x[:4] @ weight[1] + bias[1], x[4:7] @ weight[2] + bias[2]])
        torch.testing.assert_close(y[:7], ref)
    y.sum().backward()  # a gradient with zero strides (torch's own autograd rejects it)


def test_unweighted_dispatch_sums_module_outputs():
    x = torch.arange(6.0).view(3, 2)
    ids = torch.tensor([[0, 1], [1, 2], [2, 2]])
    plan = make_plan(ids, torch.ones(3, 2), 2)

    def fn(rows, groups):  # module 0 doubles, module 1 adds 1; rows in no module are 0
        y = torch.where(groups.module.unsqueeze(1) == 0, rows * 2, rows + 1)
        return y.masked_fill(groups.invalid, 0)
    out = LocalDispatcher().run(x, plan, fn, weighted=False)
    expected = torch.stack([x[0] * 2 + x[0] + 1, x[1] + 1, torch.zeros(2)])
    torch.testing.assert_close(out, expected)


def test_capacity_keeps_the_earliest_tokens_of_each_module():
    ids = torch.tensor([[0], [0], [1], [0], [2], [0]])  # module 0 chosen 4 times
    plan = make_plan(ids, torch.ones(6, 1), 2, capacity_factor=1.0)  # cap = 3
    assert int(plan.dropped) == 1
    kept = plan.token[~plan.groups.invalid.squeeze(1)].tolist()
    assert kept == [0, 1, 3, 2]  # module 0: tokens 0, 1, 3 (token 5 dropped); module 1: 2
    assert plan.groups.offsets.tolist() == [3, 4]
