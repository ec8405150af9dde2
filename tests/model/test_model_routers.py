"""Router weighting, balancing loss and SKIP/early-exit semantics."""
import torch

from mom_ds import MoMForCausalLM
from mom_ds.model import presets
from mom_ds.model.dispatch import make_plan
from mom_ds.model.routers import RouteDecision

SHAPE = dict(vocab_size=40, n_positions=16, d_model=16, n_heads=2)


def _router_grad(weighting):
    torch.manual_seed(0)
    cfg = presets.mom(top_k=1, weighting=weighting, balance_loss_coef=0.0, **SHAPE)
    model = MoMForCausalLM(cfg)
    with torch.no_grad():  # routers that tell tokens apart (at init most pick one class)
        for name, p in model.named_parameters():
            if "router" in name and name.endswith("weight"):
                p.normal_(0, 0.5)
    ids = torch.randint(0, 40, (2, 8))
    out = model(ids, labels=ids)
    assert int(out.routing.blocks[0].ffn_counts[:, :4].sum()) > 0  # some tokens ran modules
    out.loss.backward()
    block = model.chunks[0]
    return sum(float(p.grad.abs().sum()) for r in (block.attn_router, block.ffn_router)
               for p in r.parameters())


def test_k1_default_weighting_gives_the_router_an_lm_gradient():
    assert _router_grad("prob") > 1e-3


def test_k1_renorm_weighting_gives_the_router_no_lm_gradient_as_the_authors():
    assert _router_grad("renorm") < 1e-6  # w = p / p: zero up to rounding


def test_logit_weighting_is_the_chosen_raw_logit_as_the_authors_naive_router():
    """A hand-set MLP router: hidden = relu(x) = [1, 0]; logits = W2 hidden + b2 =
    [2.1, -0.8, 0.8] (softmax at T = 0.2 would give 0.999...)."""
    from mom_ds.model.routers import Router

    for top_k, ids, weights in ((1, [[0]], [[2.1]]), (2, [[0, 2]], [[2.1, 0.8]])):
        cfg = presets.mom(vocab_size=40, n_positions=16, d_model=2, n_heads=1, n_attn_modules=2,
                          n_ffn_modules=2, router="mlp", router_width=2, top_k=top_k,
                          weighting="logit")
        router = Router(cfg, "mlp", pool_size=2)
        with torch.no_grad():
            router.hidden.weight.copy_(torch.eye(2))
            router.hidden.bias.zero_()
            router.head.weight.copy_(torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.5, 0.0]]))
            router.head.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        decision, _ = router(torch.tensor([[1.0, -2.0]]), None, step=0)
        assert decision.ids.tolist() == ids
        assert torch.allclose(decision.weights, torch.tensor(weights))


def balancing_loss(router, probs, top1):
    """The router's balancing loss of a K = 1 decision, with the counts of its plan as the
    routed block hands them in."""
    ids = top1.unsqueeze(1)
    plan = make_plan(ids, torch.ones(len(ids), 1), router.pool_size, n_classes=router.n_classes)
    return float(router.balancing_loss(RouteDecision(ids, torch.ones(len(ids), 1), probs),
                                       plan.counts))


def test_balancing_loss_matches_switch_formula():
    cfg = presets.mom(top_k=1, **SHAPE)
    router = MoMForCausalLM(cfg).chunks[0].ffn_router
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.6, 0.1, 0.1, 0.1],
                          [0.2, 0.2, 0.2, 0.1, 0.3], [0.6, 0.1, 0.1, 0.1, 0.1]])
    top1 = probs.argmax(1)
    # f = [2, 1, 0, 0, 1] / 4, P = column means, N_cls = 5 (SKIP counted)
    f = torch.tensor([0.5, 0.25, 0.0, 0.0, 0.25])
    expected = 5 * float((f * probs.mean(0)).sum())
    assert abs(balancing_loss(router, probs, top1) - expected) < 1e-6
    router.count_skip = False  # SKIP left out: 4 classes
    expected = 4 * float((f[:4] * probs.mean(0)[:4]).sum())
    assert abs(balancing_loss(router, probs, top1) - expected) < 1e-6


def test_balancing_loss_counts_each_skip_acting_class():
    """A pool smaller than the router (A = 2 of 4 + SKIP classes): the plan folds classes
    2, 3 and 4 into one SKIP bucket, the balancing loss counts each of them."""
    router = MoMForCausalLM(presets.mom(n_attn_modules=2, n_ffn_modules=4, top_k=1,
                                        **SHAPE)).chunks[0].attn_router
    assert (router.pool_size, router.n_classes) == (2, 5)
    probs = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1], [0.1, 0.1, 0.1, 0.6, 0.1],
                          [0.6, 0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.6]])
    f = torch.tensor([0.25, 0.0, 0.25, 0.25, 0.25])  # top-1: classes 2, 3, 0, 4
    expected = 5 * float((f * probs.mean(0)).sum())
    assert abs(balancing_loss(router, probs, probs.argmax(1)) - expected) < 1e-6


def test_uniform_routing_has_balancing_loss_one():
    cfg = presets.mom(top_k=1, **SHAPE)
    router = MoMForCausalLM(cfg).chunks[0].ffn_router
    probs = torch.full((5, 5), 0.2)
    assert abs(balancing_loss(router, probs, torch.arange(5)) - 1.0) < 1e-6


def test_early_exit_skip_is_final():
    torch.manual_seed(3)
    model = MoMForCausalLM(presets.early_exit(4, temperature=1.0, **SHAPE))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0, 0.5)
    out = model(torch.randint(0, 40, (4, 16)))
    r = out.routing.blocks[0]
    skips = [int(r.attn_counts[h, -1]) for h in range(4)]
    assert skips == sorted(skips) and skips[-1] > 0  # exited tokens never come back
    for h in range(4):  # step h only ever uses module h
        used = r.attn_counts[h, :4].nonzero().flatten().tolist()
        assert used in ([h], [])


def test_vanilla_routed_and_shared_layers_equal_their_plain_forms():
    torch.manual_seed(0)
    plain = MoMForCausalLM(presets.vanilla(3, **SHAPE))
    routed = MoMForCausalLM(presets.vanilla_routed(3, **SHAPE))
    shared = MoMForCausalLM(presets.shared_layers(3, **SHAPE))
    sd = plain.state_dict()
    with torch.no_grad():  # per-module views: writing one writes the stacked pool
        routed_views, shared_views = routed.per_module_tensors(), shared.per_module_tensors()
        for key, value in sd.items():
            if key.startswith("bottom."):
                _, i, kind, rest = key.split(".", 3)  # bottom.{i}.{attn|ffn}.{rest}
                pool = "attn_modules" if kind == "attn" else "ffn_modules"
                routed_views[f"chunks.0.{pool}.{i}.{rest}"].copy_(value)
                if i == "0":
                    shared_views[f"chunks.0.{pool}.0.{rest}"].copy_(value)
            else:
                routed_views[key].copy_(value)
                shared_views[key].copy_(value)
    ids = torch.randint(0, 40, (2, 10))
    torch.testing.assert_close(routed(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    once = MoMForCausalLM(presets.vanilla(3, **SHAPE))
    once.load_state_dict({k: (sd[k.replace(k.split(".")[1], "0", 1)] if k.startswith("bottom.")
                              else v) for k, v in sd.items()})
    torch.testing.assert_close(shared(ids).logits, once(ids).logits, atol=1e-5, rtol=1e-5)


def test_moe_preset_routes_only_the_ffn():
    torch.manual_seed(0)
    model = MoMForCausalLM(presets.moe(2, n_experts=4, top_k=2, **SHAPE))
    out = model(torch.randint(0, 40, (2, 8)), labels=torch.randint(0, 40, (2, 8)))
    for r in out.routing.blocks:
        assert r.attn_counts[0].tolist() == [16, 0]  # one fixed module, no SKIP
        assert int(r.ffn_counts[0, :4].sum()) == 32 and int(r.ffn_counts[0, 4]) == 0
    assert float(out.balance_loss.detach()) > 0
