"""The sorted dispatch (RoutePlan + LocalDispatcher) against a naive per-token loop."""
import torch
from torch import nn

from mom_ds.parallel.dispatch import LocalDispatcher, make_plan


def test_sorted_dispatch_equals_per_token_loop_forward_and_backward():
    torch.manual_seed(0)
    n_modules, d, N, K = 5, 8, 12, 2
    mods = nn.ModuleList(nn.Linear(d, 3) for _ in range(n_modules))
    # Modules 1 and 3 receive no token; id 5 and 6 (>= pool) act as SKIP.
    ids = torch.tensor([[0, 2], [2, 4], [4, 5], [6, 0], [0, 0], [2, 6],
                        [4, 2], [5, 6], [0, 4], [2, 2], [6, 5], [4, 0]])
    weights = torch.rand(N, K, requires_grad=True)
    x = torch.randn(N, d, requires_grad=True)

    plan = make_plan(ids, weights, n_modules)
    fast = LocalDispatcher().run(x, plan, list(mods))
    fast.square().sum().backward()
    fast_grads = [p.grad.clone() for p in mods.parameters()]
    fast_dx, fast_dw = x.grad.clone(), weights.grad.clone()

    for p in list(mods.parameters()) + [x, weights]:
        p.grad = None
    rows = []
    for t in range(N):
        acc = torch.zeros(3)
        for k in range(K):
            m = int(ids[t, k])
            if m < n_modules:
                acc = acc + weights[t, k] * mods[m](x[t])
        rows.append(acc)
    slow = torch.stack(rows)
    slow.square().sum().backward()

    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(x.grad, fast_dx)
    torch.testing.assert_close(weights.grad, fast_dw)
    for (name, p), g in zip(mods.named_parameters(), fast_grads):
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, expected, msg=name)
    # Idle modules still get a gradient tensor (zeros), never None: ZeRO and DDP need it.
    for m in (1, 3):
        assert all(torch.count_nonzero(p.grad if p.grad is not None else torch.zeros(1)) == 0
                   for p in mods[m].parameters())
    assert plan.sizes == [6, 0, 6, 0, 5]
    assert plan.counts.tolist() == [6, 0, 6, 0, 5, 7]
    assert plan.chosen.tolist() == [True] * 7 + [False] + [True] * 2 + [False, True]


def test_unweighted_dispatch_sums_module_outputs():
    mods = [lambda r: r * 2, lambda r: r + 1]
    x = torch.arange(6.0).view(3, 2)
    ids = torch.tensor([[0, 1], [1, 2], [2, 2]])
    plan = make_plan(ids, torch.ones(3, 2), 2)
    out = LocalDispatcher().run(x, plan, mods, weighted=False)
    expected = torch.stack([x[0] * 2 + x[0] + 1, x[1] + 1, torch.zeros(2)])
    torch.testing.assert_close(out, expected)
