"""attention_mask with left padding, every preset: a padded batch computes, for each of its
prompts, what that prompt computes alone (logits, routing counts, greedy generation), pads
count in no statistic, loss or capacity, and a padded forward + backward reads nothing on
the host. Without a mask (or with an all-ones one) nothing changes."""
import pytest
import torch

from mom_ds import MoMForCausalLM
from mom_ds.model import pools, presets
from mom_ds.model.dispatch import make_plan
from mom_ds_testing.sync_guard import no_syncs
from test_model_generation import CASES, SHAPE  # every preset (tiny)
from test_model_no_sync import CASES as TRAINING_CASES

LENGTHS = [7, 3, 5]  # prompts of different lengths, the longest unpadded
# A capacity limit applies to a whole batch, so a prompt alone is not comparable; a batch
# and the same batch padded are.
STATISTICS_CASES = {**CASES, "capacity": presets.mom(n_routed_blocks=1, depth=2, top_k=2,
                                                     capacity_factor=1.0, temperature=1.0,
                                                     **SHAPE)}


def _model(name, seed=0):
    """Routers (GRU, MLP, MoD, predictor) at random weights large enough that tokens choose
    SKIP and different modules, MoD blocks select some tokens and not others (at GPT-2's
    init every router is nearly uniform)."""
    torch.manual_seed(seed)
    model = MoMForCausalLM(STATISTICS_CASES[name]).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router" in n or "predictor" in n:
                last = n.rsplit(".", 1)[-1]  # weight, weight_ih, bias_hh, ...
                p.normal_(0, 4 / p.shape[-1] ** 0.5) if "weight" in last else p.zero_()
    return model


def _left_padded(prompts, width):
    """Prompts padded on the left with random tokens (not one pad id: what a pad holds must
    not matter) and the mask, 1 = token."""
    ids = torch.randint(0, 64, (len(prompts), width))
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    return ids, mask


def _routing_totals(out):
    """Every routing count of a forward, flat: (attn, ffn, depth) of every block, and the
    number of tokens each MoD block selected."""
    parts = [t.reshape(-1) for r in out.routing.blocks for t in (r.attn_counts, r.ffn_counts,
                                                         r.path_length_hist)]
    parts += [m.selected.sum().reshape(1) for m in out.mod_routing]
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


@pytest.mark.parametrize("routing", ["topk", "threshold"])
@pytest.mark.parametrize("name", list(CASES))
def test_padded_batch_equals_each_prompt_alone(name, routing):
    model = _model(name)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 64, (n,)) for n in LENGTHS]
    ids, mask = _left_padded(prompts, max(LENGTHS))
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, mod_routing=routing)
        alone = [model(p[None], mod_routing=routing) for p in prompts]
    assert bool(batch.logits.isfinite().all())  # pad queries too
    for b, (p, single) in enumerate(zip(prompts, alone)):
        torch.testing.assert_close(batch.logits[b, -len(p):], single.logits[0],
                                   atol=1e-5, rtol=1e-5)
    assert torch.equal(_routing_totals(batch), sum(_routing_totals(s) for s in alone))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_padded_greedy_generation_equals_each_prompt_alone(name, use_cache):
    model = _model(name)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 64, (n,)) for n in LENGTHS]
    ids, mask = _left_padded(prompts, max(LENGTHS))
    new = 6
    batch = model.generate(ids, new, attention_mask=mask, temperature=0, use_cache=use_cache)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], new, temperature=0, use_cache=use_cache)
        assert torch.equal(batch[b, -(len(p) + new):], alone[0])


@pytest.mark.parametrize("name", list(STATISTICS_CASES))
def test_padding_changes_no_loss_and_no_routing_statistic(name):
    """A batch of two 5-token rows against the same rows spread over 8 columns with padding
    anywhere (row 0 on the left, row 1 on the left, in the middle and on the right), random
    tokens and labels that are not -100 at the pads: logits at the tokens, LM loss,
    balancing loss and MoD BCE (means over tokens) and routing counts are those of the
    tokens alone."""
    model = _model(name)
    torch.manual_seed(3)
    x, y = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 5))
    plain = model(x, labels=y)
    at = torch.tensor([[3, 4, 5, 6, 7], [1, 2, 3, 5, 6]])  # the columns of the tokens
    ids, labels = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    mask = torch.zeros(2, 8, dtype=torch.long).scatter_(1, at, 1)
    ids.scatter_(1, at, x)
    labels.scatter_(1, at, y)
    padded = model(ids, labels=labels, attention_mask=mask)
    logits = padded.logits.gather(1, at[..., None].expand(2, 5, padded.logits.shape[-1]))
    torch.testing.assert_close(logits, plain.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.lm_loss, plain.lm_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded.balance_loss, plain.balance_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded.mod_router_loss, plain.mod_router_loss, atol=1e-6,
                               rtol=1e-5)
    assert torch.equal(_routing_totals(padded), _routing_totals(plain))
    if name == "capacity":  # the limit was reached, with the same drops
        assert int(plain.routing.blocks[0].dropped) > 0
        assert torch.equal(padded.routing.blocks[0].dropped, plain.routing.blocks[0].dropped)


@pytest.mark.parametrize("name", list(STATISTICS_CASES))
def test_an_all_ones_mask_changes_nothing(name):
    """On the CPU the masked path computes bit for bit what the unmasked one does."""
    model = _model(name)
    torch.manual_seed(4)
    ids = torch.randint(0, 64, (2, 10))
    plain = model(ids[:, :-1], labels=ids[:, 1:])
    ones = model(ids[:, :-1], labels=ids[:, 1:], attention_mask=torch.ones(2, 9))
    assert torch.equal(ones.logits, plain.logits) and torch.equal(ones.loss, plain.loss)
    assert torch.equal(_routing_totals(ones), _routing_totals(plain))


@pytest.mark.parametrize("name", list(TRAINING_CASES))
def test_padded_forward_and_backward_read_nothing_on_the_host(name, monkeypatch):
    monkeypatch.setattr(pools, "grouped_mm_available", lambda x, w: True)  # CUDA's path
    config, options = TRAINING_CASES[name]
    torch.manual_seed(0)
    model = MoMForCausalLM(config)
    if "checkpointing" in options:
        model.set_activation_checkpointing(options["checkpointing"])
    ids = torch.randint(0, 64, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0
    kwargs = {k: v for k, v in options.items() if k == "loss_chunk_tokens"}
    with no_syncs():
        out = model(ids, labels=ids, attention_mask=mask, **kwargs)
        out.loss.backward()
    assert bool(out.loss.isfinite())
    assert all(p.grad is not None and bool(p.grad.isfinite().all())
               for p in model.parameters() if p.requires_grad)


def test_a_plan_with_padding_is_the_plan_of_its_tokens():
    """Pads go to SKIP whatever they chose, count nowhere and take no capacity slot: the
    plan equals the plan of the real rows alone (with capacity, one module over it)."""
    torch.manual_seed(5)
    ids = torch.randint(0, 4, (12, 2))  # 3 modules, id 3 = SKIP
    real = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    rows = real.nonzero().flatten()
    for capacity in (0.0, 1.0):
        padded = make_plan(ids, torch.ones(12, 2), 3, capacity, real)
        alone = make_plan(ids[rows], torch.ones(len(rows), 2), 3, capacity)
        assert torch.equal(padded.counts, alone.counts)
        assert (padded.dropped is None) == (alone.dropped is None) == (capacity == 0)
        if capacity:
            assert torch.equal(padded.dropped, alone.dropped)
        assert torch.equal(padded.groups.offsets, alone.groups.offsets)
        assert torch.equal(padded.chosen[rows], alone.chosen)
        assert not bool(padded.chosen[~real].any())
        n = int(alone.groups.offsets[-1])  # rows in a module, in the same order
        assert torch.equal(rows[alone.token[:n]], padded.token[:n])
    assert int(make_plan(ids, torch.ones(12, 2), 3, 1.0, real).dropped) > 0  # cap reached


def test_a_cache_keeps_the_padding_for_calls_without_a_mask():
    """After a padded prompt, a decoding call without a mask continues each row's positions
    and keeps its pads out of the keys, as with the mask extended by ones."""
    model = _model("mom_skip_mask")
    ids, mask = _left_padded([torch.randint(0, 64, (n,)) for n in LENGTHS], max(LENGTHS))
    nxt = torch.randint(0, 64, (3, 1))
    with torch.no_grad():
        masked, bare = {}, {}
        model(ids, attention_mask=mask, cache=masked, mod_routing="threshold")
        model(ids, attention_mask=mask, cache=bare, mod_routing="threshold")
        full = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        with_mask = model(nxt, attention_mask=full, cache=masked).logits
        without = model(nxt, cache=bare).logits
    assert torch.equal(with_mask, without)


def test_a_mask_that_does_not_cover_the_cache_is_refused():
    model = _model("vanilla")
    cache = {}
    model(torch.randint(0, 64, (1, 4)), cache=cache)
    with pytest.raises(ValueError, match=r"expected \(1, 6\)"):
        model(torch.randint(0, 64, (1, 2)), attention_mask=torch.ones(1, 2), cache=cache)
