"""On one rank a training forward and backward make no device-to-host sync: every preset, MoM
with SKIP (K = 1 and 2, a capacity limit, early exit), MoD, the chunked loss and activation
checkpointing run under mom_ds_testing/sync_guard.py, which fails on every aten op that reads device
data on the host on CUDA and on every Python-level read."""
import pytest
import torch

from mom_ds import MoMForCausalLM
from mom_ds.model import pools, presets
from mom_ds_testing.sync_guard import count_syncs, no_syncs

SHAPE = dict(vocab_size=64, n_positions=32, d_model=32, n_heads=4, router_width=16)

CASES = {
    "vanilla": (presets.vanilla(2, **SHAPE), {}),
    "vanilla_routed": (presets.vanilla_routed(2, **SHAPE), {}),
    "shared_layers": (presets.shared_layers(2, **SHAPE), {}),
    "moe": (presets.moe(2, n_experts=4, top_k=2, **SHAPE), {}),
    "early_exit": (presets.early_exit(3, **SHAPE), {}),
    "mod": (presets.mixture_of_depths(4, **SHAPE), {}),
    "K1": (presets.mom(n_routed_blocks=1, n_attn_modules=4, n_ffn_modules=4, depth=3, top_k=1,
                       **SHAPE), {}),
    "K2": (presets.mom(n_routed_blocks=2, n_attn_modules=4, n_ffn_modules=4, depth=2, top_k=2,
                       skip_in_attention="mask", **SHAPE), {}),
    "capacity": (presets.mom(n_routed_blocks=1, depth=2, top_k=2, capacity_factor=1.0, **SHAPE), {}),
    "chunked_loss": (presets.mom(n_routed_blocks=1, depth=2, top_k=1, **SHAPE),
                     {"loss_chunk_tokens": 8}),
    "checkpointed_layer": (presets.mom(n_routed_blocks=1, depth=2, top_k=2, **SHAPE),
                           {"checkpointing": "layer"}),
    "checkpointed_block": (presets.mixture_of_depths(2, every=1, **SHAPE),
                           {"checkpointing": "block"}),
    "llama_K2": (presets.mom(n_routed_blocks=1, n_bottom=1, depth=2, top_k=2, block="llama",
                             n_kv_heads=2, tie_word_embeddings=False, **SHAPE), {}),
    "llama_mod": (presets.mixture_of_depths(4, block="llama", n_kv_heads=2, **SHAPE), {}),
    # SKIP as a mask: grouped-query attention repeats K/V (repeat_interleave) instead
    "llama_K2_mask": (presets.mom(n_routed_blocks=1, n_bottom=1, depth=2, top_k=2,
                                  block="llama", n_kv_heads=2, skip_in_attention="mask",
                                  **SHAPE), {}),
}


def forward_backward(name: str) -> tuple[MoMForCausalLM, object]:
    config, options = CASES[name]
    torch.manual_seed(0)
    model = MoMForCausalLM(config)
    if "checkpointing" in options:
        model.set_activation_checkpointing(options["checkpointing"])
    ids = torch.randint(0, 64, (2, 16))
    kwargs = {"loss_chunk_tokens": options["loss_chunk_tokens"]} \
        if "loss_chunk_tokens" in options else {}
    with no_syncs():
        out = model(ids, labels=ids, **kwargs)
        out.loss.backward()
    return model, out


@pytest.mark.parametrize("name", CASES)
def test_forward_and_backward_read_nothing_on_the_host(name, monkeypatch):
    # the grouped-GEMM path, which CUDA takes (bf16, compute capability 9.x/10.x); torch's
    # grouped_mm runs on the CPU too. The per-module loop reads the offsets once per call.
    monkeypatch.setattr(pools, "grouped_mm_available", lambda x, w: True)
    model, out = forward_backward(name)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if name in ("K1", "K2", "capacity", "early_exit"):
        # the guard saw a routing that skips: the masked rows were exercised
        assert sum(float(r.attn_counts[:, -1].sum() + r.ffn_counts[:, -1].sum())
                   for r in out.routing.blocks) > 0


SYNCING = [
    ("bincount", lambda x: torch.bincount(x), "aten::bincount"),
    ("boolean index", lambda x: x[x > 2], "aten::index"),
    ("boolean index_put", lambda x: x.clone().index_put_((x > 2,), torch.tensor(0)),
     "aten::index_put_"),
    ("nonzero", lambda x: torch.nonzero(x), "aten::nonzero"),
    ("where of one argument", lambda x: torch.where(x > 2), "aten::nonzero"),
    ("unique", lambda x: torch.unique(x), "aten::_unique2"),
    ("masked_select", lambda x: torch.masked_select(x, x > 1), "aten::masked_select"),
    ("repeat_interleave", lambda x: torch.repeat_interleave(x.clamp(0, 2)),
     "aten::repeat_interleave"),
    ("item", lambda x: x.sum().item(), "aten::_local_scalar_dense"),
    ("bool", lambda x: bool(x.sum() > 0), "aten::_local_scalar_dense"),
    ("equal", lambda x: torch.equal(x, x), "aten::equal"),
    ("histc", lambda x: torch.histc(x.float()), "aten::histc"),
    ("multinomial", lambda x: torch.multinomial(x.float() + 1, 1), "aten::multinomial"),
    ("tolist", lambda x: x.tolist(), "Tensor.tolist"),
]


@pytest.mark.parametrize("what, read, op", SYNCING, ids=[s[0] for s in SYNCING])
def test_the_guard_catches_each_syncing_op(what, read, op):
    x = torch.randint(0, 5, (20,))
    with pytest.raises(AssertionError, match=f"host sync: {op} "):
        with no_syncs():
            read(x)


def test_the_guard_lets_the_sync_free_forms_pass():
    x = torch.randint(0, 5, (20,))
    repeats = x.clamp(0, 2)
    size = int(repeats.sum())  # known to the caller, outside the guard
    with count_syncs() as guard:
        torch.zeros(5, dtype=torch.long).scatter_add_(0, x, torch.ones_like(x))
        torch.repeat_interleave(repeats, output_size=size)
        torch.repeat_interleave(x, 2)
        x.index_select(0, torch.argsort(x))
        torch.where(x > 2, x, 0)
    assert not guard.counts


def test_the_guard_looks_inside_mom_ds_operators(monkeypatch):
    """A sync inside a custom operator's implementation is caught, although the mode sees
    the operator as one op."""
    def reading(x, weight, offsets, valid):
        offsets.tolist()
        return x.new_zeros(x.shape[0], weight.shape[2])
    monkeypatch.setitem(pools.IMPLEMENTATIONS, "mom_ds::grouped_mm", reading)
    x, weight = torch.randn(6, 4), torch.randn(2, 4, 3)
    offsets, valid = torch.tensor([2, 5], dtype=torch.int32), torch.arange(6) < 5
    with pytest.raises(AssertionError, match="host sync: Tensor.tolist"):
        with no_syncs():
            pools.grouped_mm(x, weight, offsets, valid)
