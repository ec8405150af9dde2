"""At E = 2 a routed forward + backward reads the host exactly once per exchange: the split
sizes of each uneven all-to-all (parallel/dispatch.py), counted by the aten-level guard
(mom_ds_testing/sync_guard.py) on every rank; nothing else on the path reads, the backward none."""
from __future__ import annotations


import pytest
import torch

from mom_ds_testing.multirank import run_ranks

DEPTH, BLOCKS = 2, 2


def count_on_rank(rank: int, world: int, top_k: int, block: str) -> dict:
    from mom_ds_testing.sync_guard import count_syncs
    from mom_ds import MoMForCausalLM
    from mom_ds.model import pools, presets
    from mom_ds.config import RunConfig
    from mom_ds.parallel.parallelize import parallelize

    pools.grouped_mm_available = lambda x, w: True  # CUDA's path: offsets stay on the device
    torch.manual_seed(0)
    model = MoMForCausalLM(presets.mom(n_routed_blocks=BLOCKS, n_attn_modules=4, n_ffn_modules=4,
                                       depth=DEPTH, top_k=top_k, vocab_size=48, n_positions=16,
                                       d_model=16, n_heads=2, block=block,
                                       n_kv_heads=1 if block == "llama" else 0))
    parallelize(model, RunConfig.of_model(model.config, world), training=False)
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(rank))
    model(ids, labels=ids).loss.backward()  # warm: lazy initialisation out of the count
    model.zero_grad(set_to_none=True)
    with count_syncs() as guard:
        out = model(ids, labels=ids)
        forward = dict(guard.sites)
        out.loss.backward()
    return {"forward": forward, "all": dict(guard.sites)}


@pytest.mark.slow
@pytest.mark.parametrize("top_k, block", [(1, "gpt2"), (2, "gpt2"), (2, "llama")])
def test_one_read_per_exchange_and_none_in_the_backward(top_k, block):
    # per routing step: two attention exchanges (QKV, output projection) and one FFN, in
    # either block family (SwiGLU's gate and up travel as one row: no fourth exchange)
    exchanges = BLOCKS * DEPTH * 3
    for reads in run_ranks(count_on_rank, 2, top_k, block):
        assert reads["all"] == reads["forward"], "the backward read the host"
        sites = {f"{name} @ {site}": n for (name, site), n in reads["all"].items()}
        assert list(sites) == [next(s for s in sites if "_exchange_counts" in s)], sites
        assert sum(sites.values()) == exchanges, sites
