"""The one evaluator (mom_ds/evaluation.py) against independent references: the mean
cross-entropy computed by hand from the model's logits, the validation windows as the
training sampler hands them to each rank, and one process against two ranks (bit for bit).
mom-eval against the run's own last evaluation, exactly: tests/train/test_train_single.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mom_ds.data import WindowSampler
from mom_ds.evaluation import first_windows, row_windows, score, validation_windows
from mom_ds.model import MoMForCausalLM
from mom_ds.model.presets import mom
from mom_ds.train.batches import Batches

SHAPE = dict(vocab_size=61, n_positions=32, d_model=32, n_heads=2)
SEQ = 16


class Tokens:
    """A split of `n` windows of SEQ + 1 tokens, as TokenizedDataset reads them."""

    def __init__(self, n: int, seed: int = 0):
        self.rows = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (n, SEQ + 1))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows[i].astype(np.int64)

    def windows(self, indices) -> np.ndarray:
        return np.stack([self[int(i)] for i in indices])


def tiny_mom(seed: int = 0, **extra) -> MoMForCausalLM:
    torch.manual_seed(seed)
    return MoMForCausalLM(mom(n_bottom=1, n_top=1, depth=2, top_k=2, router_width=16,
                              **SHAPE, **extra)).eval()


def test_the_loss_is_the_mean_token_cross_entropy_of_the_logits():
    model = tiny_mom()
    rows = torch.from_numpy(Tokens(10).rows)
    result = score(model, row_windows(rows, 4), config=model.config)
    with torch.no_grad():
        logits = model(rows[:, :-1]).logits
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                           rows[:, 1:].reshape(-1), reduction="mean")
    assert result.loss == pytest.approx(float(want), rel=1e-6)
    assert result.ppl == pytest.approx(float(want.exp()), rel=1e-6)
    assert (result.windows, result.tokens) == (10, 10 * SEQ)
    assert len(result.batch_losses) == 3  # 4 + 4 + 2 windows
    # the routing of every batch, summed: each token made its choices at every step
    assert result.routing.calls == 3
    assert float(result.routing.blocks[0].ffn_counts[0].sum()) == 10 * SEQ * 2
    assert 0 < result.flops_per_token


def test_a_module_is_scored_in_eval_mode_and_left_as_it_was():
    model = tiny_mom(dropout=0.5).train()  # dropout would change a training-mode loss
    a = score(model, row_windows(torch.from_numpy(Tokens(4).rows), 2))
    assert model.training
    b = score(model.eval(), row_windows(torch.from_numpy(Tokens(4).rows), 2))
    assert a.loss == b.loss


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_validation_windows_are_what_each_rank_reads_in_training(world):
    """Rank r of W reads its windows with training's own Batches over a WindowSampler of
    seed 0 (what session.py did before the evaluator): the same tokens, micro-batch by
    micro-batch, slot b * W + r."""
    data, eval_batches, micro = Tokens(23), 3, 2
    windows = validation_windows(data, eval_batches, micro, world)
    assert windows.count == eval_batches * micro * world and windows.world_size == world
    for rank in range(world):
        batches = Batches(data, WindowSampler(len(data), seed=0, rank=rank, world_size=world),
                          micro, torch.device("cpu"))
        for b in range(eval_batches):
            x, y = batches.next()
            rows = windows.read(b * world + rank, torch.device("cpu"))
            assert torch.equal(rows[:, :-1], x) and torch.equal(rows[:, 1:], y)
    # the W ranks' windows are the first W * eval_batches * micro of the seed-0 order
    order = [w for batch in first_windows(data, windows.count, micro).batches for w in batch]
    assert sorted(w for batch in windows.batches for w in batch) == sorted(order)


def two_ranks_score(rank, world):
    model = tiny_mom()
    result = score(model, validation_windows(Tokens(23), 3, 2, world), config=model.config)
    return result.loss, result.batch_losses, result.flops_per_token, \
        [t.clone() for t in result.routing.tensors()]


def test_one_process_scores_exactly_what_two_ranks_score():
    from mom_ds_testing.multirank import run_ranks

    ranks = run_ranks(two_ranks_score, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        model = tiny_mom()
        alone = score(model, validation_windows(Tokens(23), 3, 2, 2), config=model.config)
    finally:
        torch.set_num_threads(threads)
    for loss, batch_losses, flops, routing in ranks:
        assert loss == alone.loss  # exactly, not approximately
        assert batch_losses == alone.batch_losses
        assert flops == alone.flops_per_token
        assert all(torch.equal(a, b) for a, b in zip(routing, alone.routing.tensors()))


@pytest.mark.slow
def test_mom_eval_prints_the_last_training_evaluation_exactly(data, tmp_path):
    """A run whose micro-batches are not mom-eval's old fixed batch of 8 and whose loss is
    chunked: mom-eval groups the windows as the run's ranks read them, with the run's
    loss_chunk_tokens, and gets the very float the run logged. (The old
    evaluators, batches of 8 against the run's 3, differed in the last bits.)"""
    import json

    from mom_ds_testing.runs import metrics, mom_train, run_python, tiny_args

    run = tmp_path / "run"
    mom_train(*tiny_args(data, run, "--train.max_steps", "4", "--train.eval_interval", "0",
                         "--train.micro_batch_size", "3", "--train.eval_batches", "3",
                         "--train.loss_chunk_tokens", "100"))
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(run), "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scored["windows"] == 9 and scored["step"] == 4
    # exactly: the same windows, micro-batches and arithmetic (metrics.jsonl holds the
    # float's repr, as TensorBoard and the checkpoint's eval_loss hold the float)
    assert scored["loss"] == metrics(run)[4]["eval/loss"]
