"""The routing record (mom_ds/model/routing.py) against independent references: a routing
with fixed logits counted by hand, two micro-batches against one batch of both, and two
gloo ranks against one process of the global batch (the record and the FLOPs); and the
model contract (mom_ds/model/contract.py) that both trainable models implement."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from mom_ds.model import MoMConfig, MoMForCausalLM
from mom_ds.model.contract import TrainableLM
from mom_ds.model.flops import flops_per_token
from mom_ds.model.routing import RoutingRecord

# one MoD layer (bottom 1 of 2), one routed block of H = 2 steps, A = 3, F = 4
SHAPE = dict(vocab_size=64, n_positions=16, d_model=16, n_heads=2, n_bottom=2, n_top=1,
             mod_capacity=0.25, mod_every=2, n_routed_blocks=1, anchor_layers=False, depth=2,
             n_attn_modules=3, n_ffn_modules=4, top_k=1, router="mlp", router_width=8)
B, T = 2, 8


def fixed_logits(model: MoMForCausalLM, attn_class: int, ffn_class: int) -> None:
    """Every token's router logits are the head's bias alone: one-hot on the given class."""
    block = model.chunks[0]
    with torch.no_grad():
        for router, chosen in ((block.attn_router, attn_class), (block.ffn_router, ffn_class)):
            router.head.weight.zero_()
            router.head.bias.zero_()
            router.head.bias[chosen] = 10.0


def test_a_fixed_routing_counted_by_hand():
    torch.manual_seed(0)
    config = MoMConfig(**SHAPE, capacity_factor=1.0)
    model = MoMForCausalLM(config).eval()
    skip = config.n_router_classes - 1
    fixed_logits(model, attn_class=1, ffn_class=skip)  # attention: module 1; FFN: SKIP
    record = model(torch.randint(0, 64, (B, T))).routing
    N, H, A = B * T, config.depth, config.n_attn_modules
    block = record.blocks[0]
    # attention: all N tokens choose module 1 at both steps; FFN: all N choose SKIP
    assert block.attn_counts.tolist() == [[0, N, 0, 0]] * H
    assert block.ffn_counts.tolist() == [[0, 0, 0, 0, N]] * H
    # capacity ceil(1.0 * N * K / A) = 6 rows of module 1 kept, the other 10 dropped, per step
    assert int(block.dropped) == H * (N - math.ceil(N / A)) == 20
    # a dropped token still chose a module (its half counts): every token has H attention
    # halves and no FFN half, assembled depth H / 2 -> bucket H of (0, 0.5, ... H)
    assert block.path_length_hist.tolist() == [0, 0, N, 0, 0]
    # MoD: each row keeps ceil(0.25 * T) = 2 of its T tokens
    assert record.mod_selected.tolist() == [B * 2] and record.mod_tokens.tolist() == [N]
    assert record.mod_shares() == [0.25]
    assert record.calls == 1 and record.comm is None
    # two of them: every count doubles, calls too
    both = record + record
    assert both.blocks[0].attn_counts.tolist() == [[0, 2 * N, 0, 0]] * H
    assert int(both.blocks[0].dropped) == 40 and both.mod_selected.tolist() == [8]
    assert both.calls == 2 and both.blocks[0].calls == 2


def test_two_micro_batches_sum_to_one_batch_of_both():
    """Dropless and per-row MoD: a token's routing does not depend on the other rows, so the
    counts of two half batches sum to those of the whole batch."""
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**SHAPE)).eval()
    ids = torch.randint(0, 64, (4, T))
    with torch.no_grad():
        whole = model(ids).routing
        parts = RoutingRecord() + model(ids[:2]).routing + model(ids[2:]).routing
    assert parts.calls == 2 and whole.calls == 1
    for name in ("attn_counts", "ffn_counts", "path_length_hist", "dropped"):  # not balance_loss: a
        # batch statistic, not a count
        assert torch.equal(getattr(parts.blocks[0], name),
                           getattr(whole.blocks[0], name).double()), name
    assert torch.equal(parts.mod_selected, whole.mod_selected)
    assert torch.equal(parts.mod_tokens, whole.mod_tokens)
    assert float(parts.blocks[0].dropped) == 0
    cfg = model.config
    assert flops_per_token(cfg, T, parts) == pytest.approx(flops_per_token(cfg, T, whole),
                                                           rel=1e-12)


def _logging_step_on(rank: int, world: int, ckpt_dir: str) -> tuple[dict, float]:
    """Rank r runs rows [2r, 2r + 2) of the global batch as two micro-batches of one row and
    reads the logging step (train/step_log.read_step): the record summed over ranks."""
    from pathlib import Path

    from mom_ds.config import TrainConfig
    from mom_ds.train import step_log
    from mom_ds.train.health import Health

    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**SHAPE)).eval()
    ids = torch.randint(0, 64, (4, T))
    stats = RoutingRecord()
    with torch.no_grad():
        for row in (2 * rank, 2 * rank + 1):
            out = model(ids[row:row + 1])
            stats = stats + out.routing
    health = Health(torch.device("cpu"), Path(ckpt_dir), TrainConfig())
    reading = step_log.read_step({"loss": torch.tensor(1.0)}, 2, stats, health, None, model)
    return reading.routing.as_row(1), model.train_flops_per_token(T, out, reading.routing)


def test_two_ranks_sum_to_one_process_of_the_global_batch(tmp_path):
    from mom_ds_testing.multirank import run_ranks

    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**SHAPE)).eval()
    ids = torch.randint(0, 64, (4, T))
    with torch.no_grad():
        out = model(ids)
    whole = out.routing.detached()
    results = run_ranks(_logging_step_on, 2, str(tmp_path))
    for row, flops in results:
        record = RoutingRecord.from_row(row)
        assert record.calls == 4 and record.ranks == 2
        got, want = record.blocks[0], whole.blocks[0]
        for name in ("attn_counts", "ffn_counts", "path_length_hist", "dropped"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert torch.equal(record.mod_selected, whole.mod_selected)
        assert torch.equal(record.mod_tokens, whole.mod_tokens)
        assert flops == pytest.approx(model.train_flops_per_token(T, out), rel=1e-12)


def test_both_trainable_models_implement_the_contract():
    from mom_ds.config import ModularConfig
    from mom_ds.modular.student import ModularStudent

    teacher = MoMForCausalLM(MoMConfig(vocab_size=64, n_positions=16, d_model=16, n_heads=2,
                                       n_bottom=4, n_routed_blocks=0, n_top=0))
    student = ModularStudent(teacher, ModularConfig(), seed=0)
    for model in (teacher, student):
        assert isinstance(model, TrainableLM)
    names = [n for n, v in vars(TrainableLM).items() if callable(v) and not n.startswith("_")]
    assert {"forward", "num_params", "begin_step", "set_activation_checkpointing",
            "train_flops_per_token"} <= set(names)
    for name in names:
        want = inspect.signature(getattr(TrainableLM, name))
        for cls in (MoMForCausalLM, ModularStudent):
            got = inspect.signature(getattr(cls, name))
            # every parameter of the contract, same kind and default, in order; more
            # keyword parameters (with defaults) are allowed
            params = [p for p in got.parameters.values() if p.name in want.parameters]
            assert [(p.name, p.kind, p.default) for p in params] == \
                [(p.name, p.kind, p.default) for p in want.parameters.values()], (cls, name)
            extra = [p for p in got.parameters.values() if p.name not in want.parameters]
            assert all(p.default is not inspect.Parameter.empty for p in extra), (cls, name)
    # the student routes nothing: the empty record, and FLOPs from its assembly
    ids = torch.randint(0, 64, (1, 8))
    out = student(ids, labels=ids)
    assert out.routing.calls == 0 and (RoutingRecord() + out.routing).calls == 0
    assert student.train_flops_per_token(8, out, out.routing) > 0
