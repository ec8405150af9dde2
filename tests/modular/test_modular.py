"""Modular Transformers (mom_ds/modular): assemblies against a brute-force enumeration, the
student against the teacher and against models built layer by layer, the distillation
losses against hand computation, and the errors a user meets."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from mom_ds.model import ConfigError, MoMConfig, MoMForCausalLM
from mom_ds.model.modules import rotary_tables
from mom_ds.model.presets import mom, vanilla
from mom_ds.model.weights_file import save_weights
from mom_ds.modular.compress import assembled_model, choose
from mom_ds.modular.assembly import (Tile, coarsest_first, layers_for_ratio, finest_first,
                                     offered_layer_counts, ratio, sample, tilings, uniform)
from mom_ds.config import ModularConfig
from mom_ds.modular.losses import hidden_distillation, logit_distillation
from mom_ds.modular.student import ModularStudent
from mom_ds.modular.teacher import check_vanilla, fingerprint, load_teacher, teacher_config

SHAPE = dict(vocab_size=64, n_positions=32, d_model=32, n_heads=2)


def brute_force_tilings(n_layers: int, grains: tuple[int, ...]) -> set[tuple[Tile, ...]]:
    """Every composition of n_layers (2^(L-1) ways to cut it), kept when each part is a
    teacher layer or an aligned group of a listed granularity."""
    found = set()
    for cuts in itertools.product((False, True), repeat=n_layers - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n_layers]
        tiles = tuple(Tile(a, b - a) for a, b in zip(bounds, bounds[1:]))
        if all(t.size == 1 or (t.size in grains and t.start % t.size == 0) for t in tiles):
            found.add(tiles)
    return found


@pytest.mark.parametrize("n_layers,grains", [(12, (2, 3, 4, 6)), (6, (2, 3)), (8, (2, 4)),
                                             (4, (2,))])
def test_tilings_are_every_aligned_composition(n_layers, grains):
    assert set(tilings(n_layers, grains)) == brute_force_tilings(n_layers, grains)


def test_every_offered_ratio_has_a_valid_assembly():
    n_layers, grains = 12, (2, 3, 4, 6)
    valid = brute_force_tilings(n_layers, grains)
    assert offered_layer_counts(n_layers, grains) == list(range(12, 1, -1))
    for depth in offered_layer_counts(n_layers, grains):
        for rule in (coarsest_first, finest_first):
            assembly = rule(n_layers, grains, depth)
            assert assembly in valid and len(assembly) == depth
            assert ratio(assembly) == pytest.approx(12 / depth)
        assert layers_for_ratio(12 / depth, n_layers, grains) == depth
    assert finest_first(12, grains, 6) == uniform(12, 2)  # at ratio g: all g-modules
    assert coarsest_first(12, grains, 7) == (*(Tile(i, 1) for i in range(6)), Tile(6, 6))


def test_sampled_assemblies_are_valid_and_follow_p():
    n_layers, grains = 12, (2, 3, 4, 6)
    valid = brute_force_tilings(n_layers, grains)
    rng = random.Random(0)
    for p in (0.0, 0.3, 1.0):
        draws = [sample(n_layers, grains, p, rng) for _ in range(200)]
        assert all(d in valid for d in draws)
        modules = sum(t.is_module for d in draws for t in d)
        if p == 0.0:
            assert modules == 0
        if p == 1.0:  # every draw replaces at position 0, so none keeps all 12 layers
            assert all(len(d) < n_layers for d in draws)
    assert {len(d) for d in (sample(12, grains, 0.5, rng) for _ in range(200))} > {12, 6}


def test_a_ratio_no_assembly_meets_names_the_ones_that_can():
    with pytest.raises(ConfigError, match=r"--ratio 5.*1.5x \(8 layers\)"):
        layers_for_ratio(5, 12, (2, 3, 4, 6))


# --- the student --------------------------------------------------------------------------
def make_teacher(n_layer=4, seed=0, **block) -> MoMForCausalLM:
    torch.manual_seed(seed)
    return MoMForCausalLM(vanilla(n_layer, **SHAPE, **block)).eval().requires_grad_(False)


# the llama block family: rotary positions reach every tile, an untied head is the teacher's
LLAMA = dict(block="llama", n_kv_heads=1, tie_word_embeddings=False)


def make_student(teacher, perturb=True, **settings) -> ModularStudent:
    student = ModularStudent(teacher, ModularConfig(teacher="memory", **settings), seed=0)
    if perturb:  # modules that differ from the teacher layers they were copied from
        with torch.no_grad():
            for p in student.modular.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return student


def test_modules_start_as_the_first_layer_of_their_group():
    teacher = make_teacher(6)
    student = make_student(teacher, perturb=False, granularities=[2, 3])
    for g in (2, 3):
        for j in range(6 // g):
            for (name, a), b in zip(student.modular[f"g{g}"][j].state_dict().items(),
                                    teacher.bottom[j * g].state_dict().values()):
                assert torch.equal(a, b), (g, j, name)


@pytest.mark.parametrize("block", [{}, LLAMA], ids=["gpt2", "llama"])
def test_the_all_teacher_assembly_is_the_teacher(block):
    teacher = make_teacher(**block)
    student = make_student(teacher)
    ids = torch.randint(0, 64, (2, 16))
    want = teacher(ids).logits
    assert torch.equal(assembled_model(student, uniform(4, 1))(ids).logits, want)
    assert torch.equal(student(ids, assembly=uniform(4, 1)).logits, want)


@pytest.mark.parametrize("block", [{}, LLAMA], ids=["gpt2", "llama"])
def test_an_assembled_model_runs_its_tiles_in_order(block):
    """The written model against the layers applied by hand."""
    teacher = make_teacher(**block)
    student = make_student(teacher)
    assembly = (Tile(0, 1), Tile(1, 1), Tile(2, 2))
    ids = torch.randint(0, 64, (2, 16))
    if block:  # rotary positions in every layer, the head its own matrix
        x, rope = teacher.wte(ids), rotary_tables(torch.arange(16), 16, 10000.0)
        head = teacher.lm_head.weight
    else:
        x, rope, head = teacher.wte(ids) + teacher.wpe(torch.arange(16)), None, teacher.wte.weight
    x = teacher.bottom[1](teacher.bottom[0](x, rope=rope), rope=rope)
    x = student.modular["g2"][1](x, rope=rope)
    want = F.linear(teacher.ln_f(x), head)
    model = assembled_model(student, assembly)
    assert model.config.n_bottom == 3 and model.config.n_routed_blocks == 0
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(student(ids, assembly=assembly).logits, want, rtol=0, atol=1e-6)


def test_replacing_probability_zero_trains_nothing_and_scores_the_teacher():
    teacher = make_teacher()
    student = make_student(teacher, replace_prob=0.0).train()
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.randint(0, 64, (2, 16))
    for step in range(3):
        student.begin_step(step)
        out = student(ids, labels=labels)
        assert not any(t.is_module for t in out.assembly)
        assert float(out.lm_loss) == pytest.approx(float(teacher(ids, labels=labels).lm_loss),
                                                   rel=1e-6)
        assert float(out.terms["kd_loss"]) == 0.0 and float(out.terms["hidden_loss"]) == 0.0
        out.loss.backward()
    for p in student.modular.parameters():
        assert p.grad is None or not p.grad.any()
    assert not any(p.requires_grad for p in student.teacher.parameters())


def test_draws_depend_on_the_step_only():
    """One assembly per optimizer step, a function of (seed, step) alone: the same in any
    process and for every micro-batch, which keeps ranks on one graph and a resumed run on
    the uninterrupted run's draws."""
    a, b = make_student(make_teacher(6)).train(), make_student(make_teacher(6, seed=1)).train()
    ids = torch.randint(0, 64, (1, 8))
    draws = []
    for student in (a, b):
        seq = []
        for step in (5, 6, 5):
            student.begin_step(step)
            seq += [student(ids, labels=ids).assembly, student(ids, labels=ids).assembly]
        draws.append(seq)
    assert draws[0] == draws[1]
    assert draws[0][0] == draws[0][1] == draws[0][4]  # micro-batches of step 5, and step 5 again
    assert len({a.draw(step) for step in range(20)}) > 1


def test_replacing_probability_follows_the_linear_curriculum():
    student = make_student(make_teacher(), replace_prob=0.1, replace_prob_slope=6e-4)
    assert student.replace_prob(0) == pytest.approx(0.1)
    assert student.replace_prob(1000) == pytest.approx(0.7)
    assert student.replace_prob(5000) == 1.0


# --- the losses against hand computation ----------------------------------------------------
def test_logit_distillation_by_hand():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]]])
    T = 2.0

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kls = []
    for s_row, t_row in zip(student[0].tolist(), teacher[0].tolist()):
        ps, pt = softmax(s_row), softmax(t_row)
        kls.append(sum(q * math.log(q / p) for p, q in zip(ps, pt)))
    assert float(logit_distillation(student, teacher, T)) == pytest.approx(T * T * sum(kls) / 2)
    ignore_second = torch.tensor([[1, -100]])
    assert float(logit_distillation(student, teacher, T, ignore_second)) == \
        pytest.approx(T * T * kls[0])


def test_hidden_distillation_compares_the_ends_of_the_module_groups():
    """Assembly t0 t1 g2[1] t4 t5 of a 6-layer teacher: one module, standing for teacher
    layers 2 and 3, so the loss is the MSE between the state after the module and the
    teacher's state after its layer 3 (index 4 of the states), computed here by hand."""
    teacher = make_teacher(6)
    student = make_student(teacher, granularities=[2], kd_weight=0.0, lm_weight=0.0,
                           hidden_weight=1.0).train()
    assembly = (Tile(0, 1), Tile(1, 1), Tile(2, 2), Tile(4, 1), Tile(5, 1))
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        t2 = teacher.bottom[1](teacher.bottom[0](teacher.wte(ids) + teacher.wpe(torch.arange(16))))
        t4 = teacher.bottom[3](teacher.bottom[2](t2))
        want = ((student.modular["g2"][1](t2) - t4) ** 2).mean()
    out = student(ids, labels=ids, assembly=assembly)
    assert float(out.terms["hidden_loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert hidden_distillation([]) is None
    with pytest.raises(ValueError, match="not an assembly"):
        student(ids, assembly=(Tile(0, 1), Tile(1, 2), Tile(3, 1), Tile(4, 2)))


# --- compute chosen at inference ------------------------------------------------------------
def test_depth_and_top_k_modules_as_trained_give_the_same_logits_and_fewer_steps_fewer_flops():
    from mom_ds.model.flops import flops_per_token
    from mom_ds.checkpoints.loading import with_compute

    torch.manual_seed(0)
    config = mom(n_attn_modules=4, n_ffn_modules=4, depth=4, top_k=2, router_width=16, **SHAPE)
    trained = MoMForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 16))
    same = MoMForCausalLM(with_compute(config, depth=4, top_k=2))
    same.load_state_dict(trained.state_dict())
    assert torch.equal(same.eval()(ids).logits, trained(ids).logits)
    flops = []
    for depth in (4, 3, 2, 1):
        model = MoMForCausalLM(with_compute(config, depth=depth))
        model.load_state_dict(trained.state_dict())
        out = model.eval()(ids)
        assert len(out.routing.blocks[0].attn_counts) == depth
        flops.append(flops_per_token(model.config, 16, out.routing))
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4
    one = MoMForCausalLM(with_compute(config, top_k=1))
    one.load_state_dict(trained.state_dict())
    assert flops_per_token(one.config, 16, one.eval()(ids).routing) < flops[0]
    with pytest.raises(ConfigError, match="--depth 3 / --top-k-modules 9"):
        with_compute(config, depth=3, top_k=9)
    with pytest.raises(ConfigError, match="has none"):
        with_compute(vanilla(2, **SHAPE), depth=2)


# --- bad input --------------------------------------------------------------------------------
def test_a_granularity_that_does_not_divide_the_teacher_is_refused():
    with pytest.raises(ConfigError, match=r"\[4\] do not divide the teacher's 6 layers.*\[2, 3, 6\]"):
        ModularConfig(teacher="t", granularities=[2, 4]).resolve(vanilla(6, **SHAPE))
    assert ModularConfig(teacher="t").resolve(vanilla(12, **SHAPE)) == (2, 3, 4, 6)
    with pytest.raises(ConfigError, match="granularity must be >= 2"):
        ModularConfig(teacher="t", granularities=[1, 2])


def test_a_teacher_that_is_not_vanilla_is_refused(tmp_path):
    config = mom(n_bottom=1, router_width=16, **SHAPE)
    path = save_weights(tmp_path / "mom.safetensors", config.to_dict(),
                        MoMForCausalLM(config).state_dict(), 0)
    with pytest.raises(ConfigError, match="is a MoM model.*stack of at least 2 vanilla layers"):
        teacher_config(str(path))
    with pytest.raises(ConfigError, match="Mixture-of-Depths"):
        check_vanilla(MoMConfig(n_bottom=4, n_routed_blocks=0, mod_capacity=0.5, **SHAPE), "x")
    with pytest.raises(ConfigError, match="modular.teacher = .*missing-dir-or-hub-name.*is "
                                          "neither a directory nor a Hugging Face model"):
        teacher_config(str(tmp_path / "missing-dir-or-hub-name"))


def test_a_student_from_another_teacher_is_refused(tmp_path):
    a, b = make_teacher(seed=0), make_teacher(seed=1)
    for name, teacher in (("a", a), ("b", b)):
        save_weights(tmp_path / f"{name}.safetensors", teacher.config.to_dict(),
                     teacher.state_dict(), 0)
    assert load_teacher(str(tmp_path / "a.safetensors"), fingerprint(a)).fingerprint == \
        fingerprint(a)
    with pytest.raises(ConfigError, match="belong to another teacher"):
        load_teacher(str(tmp_path / "b.safetensors"), fingerprint(a))


def test_search_picks_the_lowest_held_out_loss():
    teacher = make_teacher(6)
    student = make_student(teacher, granularities=[2, 3]).eval()
    rows = torch.randint(0, 64, (4, 17))
    best, scored = choose(student, 4, "search", rows)
    assert len(scored) == len([a for a in tilings(6, (2, 3)) if len(a) == 4])
    losses = []
    for _, candidate in scored:  # each candidate scored by the assembled model itself
        model = assembled_model(student, candidate)
        with torch.no_grad():
            losses.append(float(model(rows[:, :-1], labels=rows[:, 1:]).lm_loss))
    assert best == scored[0][1] and losses.index(min(losses)) == 0


# --- learned assembly -------------------------------------------------------------------------
def test_a_routed_path_computes_what_its_tokens_alone_would():
    """Tokens routed to a path attend only to each other: each path's outputs equal running
    that path, unmasked, on the subsequence of its tokens (a sparse execution)."""
    from mom_ds.modular.learned import LearnedAssembly

    teacher = make_teacher(4)
    student = make_student(teacher, granularities=[2])
    routed = LearnedAssembly(student, segment=2, price=0.0).eval()
    ids = torch.randint(0, 64, (1, 12))
    choice = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1]])
    x = teacher.wte(ids) + teacher.wpe(torch.arange(12))
    with torch.no_grad():
        for p, path in enumerate(routed.paths[0]):
            masked = routed._run(path, x, choice == p)
            tokens = (choice[0] == p).nonzero().flatten()
            alone = x[:, tokens]
            for tile in path:
                alone = student.layer(tile)(alone)
            torch.testing.assert_close(masked[:, tokens], alone, rtol=0, atol=1e-5)


def test_routers_follow_the_price_of_a_layer():
    from mom_ds.modular.learned import LearnedAssembly, fit_routers

    teacher = make_teacher(4)
    student = make_student(teacher, granularities=[2])
    ids = torch.randint(0, 64, (4, 17))

    class Fixed:
        def next(self):
            return ids[:, :-1], ids[:, 1:]

    layers, routed = {}, {}
    for price in (0.0, 100.0):
        routed[price] = LearnedAssembly(student, segment=2, price=price)
        fit_routers(routed[price], Fixed(), steps=20, lr=0.05)
        layers[price] = float(routed[price].eval()(ids[:, :-1]).layers.mean())
    assert layers[0.0] == 4.0  # the teacher's own layers are exact: no error at all
    assert layers[100.0] == 2.0  # every segment through its one g2 module
    # all tokens on one path: that uniform assembly
    torch.testing.assert_close(routed[100.0](ids[:, :-1]).logits,
                               assembled_model(student, uniform(4, 2))(ids[:, :-1]).logits)


def test_a_hugging_face_gpt2_is_a_teacher(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=4,
                                    n_head=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert teacher_config(str(tmp_path / "hf")).n_bottom == 4
    teacher = load_teacher(str(tmp_path / "hf"))
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
