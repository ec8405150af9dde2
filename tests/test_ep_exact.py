"""Expert parallelism is exact: E = 2 and E = 4 ranks (module pools sharded, tokens moved by
all-to-all) give the outputs, loss and every parameter's gradient of one process on the same
global batch; the clipping norm is the single-process norm; ranks out of step get a named
error, not a hang."""
import pytest
import torch
import torch.distributed as dist

from multirank import run_ranks
from mom_ds import MoMForCausalLM
from mom_ds.model import presets
from mom_ds.parallel.dispatch import ExpertParallelMismatch
from mom_ds.parallel.expert import (apply_expert_parallel, expert_grad_norm, full_state_dict,
                                    load_full_state_dict, reduce_expert_gradients,
                                    use_global_balance_stats)
from mom_ds.parallel.groups import expert_parallel_groups
from mom_ds.parallel.placement import is_expert_parameter, local_to_global_name

SHAPE = dict(vocab_size=48, n_positions=16, d_model=16, n_heads=2)
GLOBAL_BATCH = 8


def build(top_k, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = presets.mom(n_bottom=1, n_chunks=2, n_attn_modules=4, n_ffn_modules=4, depth=2,
                      top_k=top_k, temperature=1.0, **SHAPE, **extra)
    model = MoMForCausalLM(cfg)
    with torch.no_grad():  # routers that spread tokens over modules and SKIP
        for name, p in model.named_parameters():
            if "router" in name and name.endswith("weight"):
                p.normal_(0, 0.5)
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 48, (GLOBAL_BATCH, 12), generator=g)
    return ids, torch.randint(0, 48, (GLOBAL_BATCH, 12), generator=g)


def reference(top_k):
    model = build(top_k)
    ids, labels = batch()
    out = model(ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
    skips = sum(int(r.attn_counts[:, -1].sum() + r.ffn_counts[:, -1].sum()) for r in out.routing)
    return out.logits.detach(), float(out.loss.detach()), grads, float(norm), skips


def expert_parameters(model):
    return [p for p in model.parameters() if is_expert_parameter(p)]


def global_grad_norm(model, ep_group):
    """Dense gradients are identical on every rank after reduction (counted once); the
    module pools' norm is expert_grad_norm's (what mom-train joins to DeepSpeed's norm)."""
    dense = [p.grad.float().pow(2).sum() for p in model.parameters()
             if not is_expert_parameter(p)]
    return (torch.stack(dense).sum() + expert_grad_norm(expert_parameters(model),
                                                        ep_group).pow(2)).sqrt()


def ep_rank_steps(rank, world):
    return [ep_rank_step(rank, world, top_k) for top_k in (1, 2)]


def ep_rank_step(rank, world, top_k):
    """Pools sharded; dense gradients averaged as the engine does, expert gradients reduced
    by reduce_expert_gradients (what mom-train's ModulePools calls)."""
    model = build(top_k)
    apply_expert_parallel(model, world)
    use_global_balance_stats(model)
    _, edp_group = expert_parallel_groups(world)
    ep_group, _ = expert_parallel_groups(world)
    ids, labels = batch()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    out = model(ids[rows], labels=labels[rows])
    out.loss.backward()
    for p in model.parameters():  # dense: average over data parallel (what the engine does)
        if not getattr(p, "mom_expert", False):
            dist.all_reduce(p.grad)
            p.grad /= world
    reduce_expert_gradients(expert_parameters(model), edp_group, world)
    ep_size, ep_rank = model.expert_parallel
    grads = {local_to_global_name(n, ep_size, ep_rank, model.config): p.grad.clone()
             for n, p in model.named_parameters()}
    norm = float(global_grad_norm(model, ep_group))
    return out.logits.detach(), float(out.loss.detach()), grads, norm


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_process(world):
    per_rank = run_ranks(ep_rank_steps, world)
    for i, top_k in enumerate((1, 2)):
        check_equal_to_reference([r[i] for r in per_rank], world, top_k)


def check_equal_to_reference(results, world, top_k):
    ref_logits, ref_loss, ref_grads, ref_norm, skips = reference(top_k)
    assert skips > 0  # SKIP was really chosen
    torch.testing.assert_close(torch.cat([r[0] for r in results]), ref_logits,
                               atol=1e-5, rtol=1e-5)
    assert abs(sum(r[1] for r in results) / world - ref_loss) < 1e-5
    for rank, (_, _, grads, norm) in enumerate(results):
        assert abs(norm - ref_norm) < 1e-5 * max(1.0, ref_norm)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4,
                                       msg=f"rank {rank} {name}")
    covered = set().union(*(r[2].keys() for r in results))
    assert covered == set(ref_grads)  # every module of the pool lives on some rank


def lopsided_rank_step(rank, world):
    """Rank 0's tokens all choose modules it owns; module 3 is never chosen by anyone."""
    model = build(1, use_skip=False)
    with torch.no_grad():
        for block in model.chunks:
            for router in (block.attn_router, block.ffn_router):
                router.head.weight.zero_()
                router.head.bias.copy_(torch.tensor([5.0, 0.0, 0.0, -50.0] if rank == 0
                                                    else [0.0, 0.0, 5.0, -50.0]))
    apply_expert_parallel(model, world)
    ids, labels = batch()
    out = model(ids[rank * 4:(rank + 1) * 4], labels=labels[rank * 4:(rank + 1) * 4])
    out.loss.backward()
    counts = [r.ffn_counts.sum(0).tolist() for r in out.routing]
    return counts, all(p.grad is not None for p in model.parameters())


def edge_cases(rank, world):
    return lopsided_rank_step(rank, world), out_of_step_rank(rank, world)


@pytest.fixture(scope="module")
def edge_results():
    return run_ranks(edge_cases, 2, timeout=180)


@pytest.mark.slow
def test_idle_rank_and_idle_module_complete_the_step(edge_results):
    results = [r[0] for r in edge_results]
    for counts, all_grads in results:
        assert all_grads
        assert all(c[3] == 0 for c in counts)  # module 3 got nothing from anyone
    assert results[0][0][0][1] + results[0][0][0][2] + results[0][0][0][3] == 0  # all local


def out_of_step_rank(rank, world):
    model = build(1)
    apply_expert_parallel(model, world)
    if rank == 1:  # rank 1 believes it is one exchange ahead (a skipped forward call)
        model.chunks[0].dispatcher.calls += 1
    ids, labels = batch()
    try:
        model(ids[rank * 4:(rank + 1) * 4])
    except ExpertParallelMismatch as err:
        return str(err)
    return None


@pytest.mark.slow
def test_out_of_step_ranks_raise_a_named_error(edge_results):
    messages = [r[1] for r in edge_results]
    assert all(m is not None for m in messages)
    assert "rank 0" in messages[0] and "rank 1" in messages[0] and "exchange #" in messages[0]


def reshard_rank(rank, world, full):
    model = build(2, seed=7)  # different init: the loaded weights must win
    if world > 1:
        apply_expert_parallel(model, world)
    load_full_state_dict(model, full)
    ids, _ = batch()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    with torch.no_grad():
        logits = model(ids[rows]).logits
    return logits, full_state_dict(model, expert_parallel_groups(world)[0] if world > 1 else None)


@pytest.mark.slow
def test_weights_saved_at_one_size_load_at_another():
    saved = run_ranks(reshard_rank, 2, {k: v for k, v in build(2).state_dict().items()})
    full_e2 = saved[0][1]
    ref = build(2)
    ids, _ = batch()
    with torch.no_grad():
        expected = ref(ids).logits
    one_rank = build(2, seed=7)
    load_full_state_dict(one_rank, full_e2)
    with torch.no_grad():
        torch.testing.assert_close(one_rank(ids).logits, expected, atol=1e-5, rtol=1e-5)
    results = run_ranks(reshard_rank, 4, full_e2)
    torch.testing.assert_close(torch.cat([r[0] for r in results]), expected,
                               atol=1e-5, rtol=1e-5)
    assert set(full_e2) == set(ref.state_dict())
