"""WindowSampler: epochs without replacement, rank sharding, exact resume."""
import itertools

import pytest

from mom_ds.data import DataError, WindowSampler


def take(sampler, n):
    return list(itertools.islice(sampler, n))


def test_each_epoch_is_a_permutation_without_repeats():
    s = WindowSampler(101, seed=7)
    first, second = take(s, 101), take(s, 101)
    assert sorted(first) == sorted(second) == list(range(101))
    assert first != second  # a fresh permutation per epoch
    assert s.state_dict() == {"epoch": 1, "cursor": 101, "world_size": 1}


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_ranks_partition_each_epoch(world_size):
    n = 103
    per_rank = n // world_size
    shards = [take(WindowSampler(n, seed=1, rank=r, world_size=world_size), per_rank) for r in range(world_size)]
    union = [i for shard in shards for i in shard]
    assert all(len(shard) == per_rank for shard in shards)
    assert len(set(union)) == len(union) == per_rank * world_size  # no window on two ranks
    assert n - len(union) < world_size  # only the remainder is dropped


def test_deterministic_per_seed():
    assert take(WindowSampler(50, seed=3), 120) == take(WindowSampler(50, seed=3), 120)
    assert take(WindowSampler(50, seed=3), 50) != take(WindowSampler(50, seed=4), 50)


@pytest.mark.parametrize("stop", [0, 1, 17, 33, 34, 70])
def test_resume_yields_exactly_the_uninterrupted_sequence(stop):
    uninterrupted = take(WindowSampler(34, seed=5, rank=1, world_size=2), 100)
    first = WindowSampler(34, seed=5, rank=1, world_size=2)
    before = take(first, stop)
    resumed = WindowSampler(34, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(dict(first.state_dict()))
    assert before + take(resumed, 100 - stop) == uninterrupted


def test_bad_arguments_and_state():
    with pytest.raises(DataError):
        WindowSampler(10, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="cannot be shared"):
        WindowSampler(3, seed=0, rank=0, world_size=4)
    with pytest.raises(DataError, match="does not fit"):
        WindowSampler(10, seed=0).load_state_dict({"epoch": 0, "cursor": 11})


def test_a_position_saved_with_two_ranks_continues_with_one_and_four():
    """The windows after the resume are those the two ranks would have taken next."""
    n = 64
    two = [WindowSampler(n, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        for s in two:
            next(s)
    state = two[0].state_dict()  # cursor 4 of 2 ranks = 8 windows taken
    taken_next = sorted(next(s) for s in two for _ in range(2))  # the next 4 windows
    for world in (1, 4):
        ranks = [WindowSampler(n, seed=3, rank=r, world_size=world) for r in range(world)]
        for s in ranks:
            s.load_state_dict(state)
        got = sorted(next(s) for s in ranks for _ in range(4 // world))
        assert got == taken_next
    with pytest.raises(DataError, match="not a multiple of 3 ranks"):
        WindowSampler(n, seed=3, rank=0, world_size=3).load_state_dict(
            {"epoch": 0, "cursor": 1, "world_size": 2})
