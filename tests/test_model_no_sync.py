"""On one rank a routed block makes no device-to-host sync: forward and backward of a MoM
with SKIP (K = 1 and K = 2, a capacity limit, early exit) run under a guard that fails on
every Python-level way to read a tensor on the host."""
import contextlib

import pytest
import torch

from mom_ds import MoMForCausalLM
from mom_ds.model import pools, presets

SHAPE = dict(vocab_size=64, n_positions=32, d_model=32, n_heads=4, router_width=16)
READS = ("item", "tolist", "cpu", "nonzero", "__bool__", "__int__", "__float__", "numpy")


@contextlib.contextmanager
def no_host_reads():
    saved = {name: getattr(torch.Tensor, name) for name in READS}
    saved_nonzero = torch.nonzero

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name}")
        return read
    try:
        for name in READS:
            setattr(torch.Tensor, name, refuse(name))
        torch.nonzero = refuse("torch.nonzero")
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = saved_nonzero


CASES = {
    "K1": presets.mom(n_chunks=1, n_attn_modules=4, n_ffn_modules=4, depth=3, top_k=1, **SHAPE),
    "K2": presets.mom(n_chunks=2, n_attn_modules=4, n_ffn_modules=4, depth=2, top_k=2,
                      skip_in_attention="mask", **SHAPE),
    "capacity": presets.mom(n_chunks=1, depth=2, top_k=2, capacity_factor=1.0, **SHAPE),
    "early_exit": presets.early_exit(3, **SHAPE),
    "moe": presets.moe(2, n_experts=4, top_k=2, **SHAPE),
}


@pytest.mark.parametrize("name", CASES)
def test_forward_and_backward_read_nothing_on_the_host(name, monkeypatch):
    # the grouped-GEMM path, which CUDA takes (bf16, compute capability 9.x/10.x); torch's
    # grouped_mm runs on the CPU too. The per-module loop reads the offsets once per call.
    monkeypatch.setattr(pools, "grouped_mm_available", lambda x, w: True)
    torch.manual_seed(0)
    model = MoMForCausalLM(CASES[name])
    ids = torch.randint(0, 64, (2, 16))
    with no_host_reads():
        out = model(ids, labels=ids)
        out.loss.backward()
    skipped = sum(float(r.attn_counts[:, -1].sum() + r.ffn_counts[:, -1].sum())
                  for r in out.routing)
    assert all(p.grad is not None for p in model.parameters())
    if name != "moe":  # the guard saw a routing that skips: the masked rows were exercised
        assert skipped > 0


def test_the_guard_catches_a_sync():
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_reads():
            torch.ones(3).sum().item()
