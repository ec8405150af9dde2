"""What each rank holds of the module pools' AdamW state, measured from the optimizer's own
tensors (the fp32 fragments ZeRO gives each rank), not assumed: 2 ranks, E = 1, ZeRO-2 ->
half of the pools' state per rank; 4 ranks, E = 2 -> a quarter."""
import pytest
import torch

from multirank import run_ranks
from mom_ds import MoMForCausalLM
from mom_ds.model import presets
from mom_ds.parallel.parallelize import engine_param_groups, parallelize

pytestmark = pytest.mark.slow
SHAPE = dict(vocab_size=48, n_positions=16, d_model=16, n_heads=2, router_width=8)


def pool_state_held(rank, world, ep_size, stage):
    """(fp32 pool elements whose master weight and AdamW moments this rank holds: its
    fragments of ZeRO's fp32 partitions, which the moments match; pool elements in the
    model)."""
    import deepspeed

    torch.manual_seed(0)
    model = MoMForCausalLM(presets.mom(n_chunks=2, n_attn_modules=4, n_ffn_modules=4, depth=2,
                                       **SHAPE))
    total = sum(p.numel() for n, p in model.named_parameters() if "_pool." in n)
    parallelize(model, ep_size)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=engine_param_groups(model, 0.1))
    ids = torch.randint(0, 48, (2, 8))
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    held = 0
    for name, p in model.named_parameters():
        if "_pool." not in name:
            continue
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition of the parameter
            held += p.ds_tensor.numel()
        elif p._hp_mapping is not None:  # ZeRO-1/2: this rank's fragment of the fp32 master
            held += p._hp_mapping.lp_fragment_address.numel
    return held, total


@pytest.mark.parametrize("world,ep_size,share", [(2, 1, 1 / 2), (4, 2, 1 / 4)])
@pytest.mark.parametrize("stage", [2, 3])
def test_each_rank_holds_its_share_of_the_pools_optimizer_state(world, ep_size, share, stage):
    results = run_ranks(pool_state_held, world, ep_size, stage)
    total = results[0][1]
    # every pool element's state is held exactly once per expert-data-parallel replica set
    assert sum(held for held, _ in results) == round(total * world * share)
    for rank, (held, _) in enumerate(results):
        # ZeRO cuts each parameter group's flat buffer evenly, not each tensor, so a rank's
        # part of the pools is its share give or take the other parameters of the group
        assert held == pytest.approx(share * total, rel=0.05), (rank, held, total)
