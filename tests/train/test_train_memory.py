"""What each rank holds of the module pools' AdamW state, measured from the optimizer's own
tensors (the fp32 fragments and partitions ZeRO gives each rank, which the moments match;
bench/pool_memory.py's measurement), not assumed: 2 ranks, E = 1 -> half of the pools'
state per rank; 4 ranks, E = 2 -> a quarter."""

import pytest

from mom_ds_testing.multirank import run_ranks

from pool_memory import build, rank_bytes

pytestmark = pytest.mark.slow
WIDTH = 16


@pytest.mark.parametrize("world,ep_size,share", [(2, 1, 1 / 2), (4, 2, 1 / 4)])
@pytest.mark.parametrize("stage", [2, 3])
def test_each_rank_holds_its_share_of_the_pools_optimizer_state(world, ep_size, share, stage):
    total = sum(p.numel() for n, p in build(WIDTH).named_parameters() if "_pool." in n)
    held = [master // 4 for _, master, _ in run_ranks(rank_bytes, world, ep_size, stage, WIDTH)]
    # every pool element's state is held exactly once in the job
    assert sum(held) == round(total * world * share)
    for rank, mine in enumerate(held):
        # ZeRO cuts each parameter group's flat buffer evenly, not each tensor, so a rank's
        # part of the pools is its share give or take the other parameters of the group
        assert mine == pytest.approx(share * total, rel=0.05), (rank, mine, total)
