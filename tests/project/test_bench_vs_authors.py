"""bench/vs_authors.py, the parts that run offline: the map from the MoM authors' parameter
names onto mom-ds's (on a fake state dict with their real names and shapes), the router-decision
comparison, and the argument errors. The benchmark itself needs their code (network) and is not
run here."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

import vs_authors as va

# The state dict of their GPT2MoTLMHeadModel (mom/model.py, transformers 4.40.2) for LAYOUT,
# names and shapes as their code produced them: 1 bottom layer, one routed block (A = 2,
# F = 3: their routers then have max(A, F) + 1 classes) + anchor, 1 top layer.
LAYOUT = va.Layout(vocab=16, seq=8, batch=1, d_model=8, n_heads=2, n_bottom=1, n_routed_blocks=1,
                   n_top=1, n_attn=2, n_ffn=3, depth=2, router_width=4)
THEIR_STATE = """
transformer.wte.weight 16 8
transformer.wpe.weight 8 8
transformer.h.0.mot_attn.attention_layernorm.weight 8
transformer.h.0.mot_attn.attention_layernorm.bias 8
transformer.h.0.mot_attn.c_attn.weight 8 24
transformer.h.0.mot_attn.c_attn.bias 24
transformer.h.0.mot_attn.c_proj.weight 8 8
transformer.h.0.mot_attn.c_proj.bias 8
transformer.h.0.mot_ffn.ffn_layernorm.weight 8
transformer.h.0.mot_ffn.ffn_layernorm.bias 8
transformer.h.0.mot_ffn.c_fc.weight 8 32
transformer.h.0.mot_ffn.c_fc.bias 32
transformer.h.0.mot_ffn.c_proj.weight 32 8
transformer.h.0.mot_ffn.c_proj.bias 8
transformer.h.1.mot_attn.attention_layernorm.0.weight 8
transformer.h.1.mot_attn.attention_layernorm.0.bias 8
transformer.h.1.mot_attn.attention_layernorm.1.weight 8
transformer.h.1.mot_attn.attention_layernorm.1.bias 8
transformer.h.1.mot_attn.c_attn.0.weight 8 24
transformer.h.1.mot_attn.c_attn.0.bias 24
transformer.h.1.mot_attn.c_attn.1.weight 8 24
transformer.h.1.mot_attn.c_attn.1.bias 24
transformer.h.1.mot_attn.c_proj.0.weight 8 8
transformer.h.1.mot_attn.c_proj.0.bias 8
transformer.h.1.mot_attn.c_proj.1.weight 8 8
transformer.h.1.mot_attn.c_proj.1.bias 8
transformer.h.1.mot_attn.router.router.weight 4 4
transformer.h.1.mot_attn.router.router.bias 4
transformer.h.1.mot_attn.router.h2h.weight 12 4
transformer.h.1.mot_attn.router.h2h.bias 12
transformer.h.1.mot_attn.router.x2h.weight 12 8
transformer.h.1.mot_attn.router.x2h.bias 12
transformer.h.1.mot_ffn.ffn_layernorm.0.weight 8
transformer.h.1.mot_ffn.ffn_layernorm.0.bias 8
transformer.h.1.mot_ffn.ffn_layernorm.1.weight 8
transformer.h.1.mot_ffn.ffn_layernorm.1.bias 8
transformer.h.1.mot_ffn.ffn_layernorm.2.weight 8
transformer.h.1.mot_ffn.ffn_layernorm.2.bias 8
transformer.h.1.mot_ffn.c_fc.0.weight 8 32
transformer.h.1.mot_ffn.c_fc.0.bias 32
transformer.h.1.mot_ffn.c_fc.1.weight 8 32
transformer.h.1.mot_ffn.c_fc.1.bias 32
transformer.h.1.mot_ffn.c_fc.2.weight 8 32
transformer.h.1.mot_ffn.c_fc.2.bias 32
transformer.h.1.mot_ffn.c_proj.0.weight 32 8
transformer.h.1.mot_ffn.c_proj.0.bias 8
transformer.h.1.mot_ffn.c_proj.1.weight 32 8
transformer.h.1.mot_ffn.c_proj.1.bias 8
transformer.h.1.mot_ffn.c_proj.2.weight 32 8
transformer.h.1.mot_ffn.c_proj.2.bias 8
transformer.h.1.mot_ffn.router.router.weight 4 4
transformer.h.1.mot_ffn.router.router.bias 4
transformer.h.1.mot_ffn.router.h2h.weight 12 4
transformer.h.1.mot_ffn.router.h2h.bias 12
transformer.h.1.mot_ffn.router.x2h.weight 12 8
transformer.h.1.mot_ffn.router.x2h.bias 12
transformer.h.2.mot_attn.attention_layernorm.weight 8
transformer.h.2.mot_attn.attention_layernorm.bias 8
transformer.h.2.mot_attn.c_attn.weight 8 24
transformer.h.2.mot_attn.c_attn.bias 24
transformer.h.2.mot_attn.c_proj.weight 8 8
transformer.h.2.mot_attn.c_proj.bias 8
transformer.h.2.mot_ffn.ffn_layernorm.weight 8
transformer.h.2.mot_ffn.ffn_layernorm.bias 8
transformer.h.2.mot_ffn.c_fc.weight 8 32
transformer.h.2.mot_ffn.c_fc.bias 32
transformer.h.2.mot_ffn.c_proj.weight 32 8
transformer.h.2.mot_ffn.c_proj.bias 8
transformer.h.3.mot_attn.attention_layernorm.weight 8
transformer.h.3.mot_attn.attention_layernorm.bias 8
transformer.h.3.mot_attn.c_attn.weight 8 24
transformer.h.3.mot_attn.c_attn.bias 24
transformer.h.3.mot_attn.c_proj.weight 8 8
transformer.h.3.mot_attn.c_proj.bias 8
transformer.h.3.mot_ffn.ffn_layernorm.weight 8
transformer.h.3.mot_ffn.ffn_layernorm.bias 8
transformer.h.3.mot_ffn.c_fc.weight 8 32
transformer.h.3.mot_ffn.c_fc.bias 32
transformer.h.3.mot_ffn.c_proj.weight 32 8
transformer.h.3.mot_ffn.c_proj.bias 8
transformer.ln_f.weight 8
transformer.ln_f.bias 8
lm_head.weight 16 8
"""


def fake_state() -> dict:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for line in THEIR_STATE.strip().splitlines():
        name, *shape = line.split()
        state[name] = torch.randn(*map(int, shape), generator=gen)
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied, as in their model
    return state


def loaded():
    side = va.MomdsSide()
    state = fake_state()
    side.build(LAYOUT, state)
    return side, state


def test_their_names_land_in_our_modules():
    side, s = loaded()
    m = side.model
    h = "transformer.h."
    # Conv1D (in, out) is the stacked pools' own layout; our vanilla layers are nn.Linear
    assert torch.equal(m.chunks[0].attn_pool.qkv.weight[1], s[h + "1.mot_attn.c_attn.1.weight"])
    assert torch.equal(m.chunks[0].attn_pool.qkv.ln_weight[0],
                       s[h + "1.mot_attn.attention_layernorm.0.weight"])
    assert torch.equal(m.chunks[0].ffn_pool.proj.bias[2], s[h + "1.mot_ffn.c_proj.2.bias"])
    assert torch.equal(m.chunks[0].attn_router.cell.weight_ih,
                       s[h + "1.mot_attn.router.x2h.weight"])
    assert torch.equal(m.chunks[0].ffn_router.cell.bias_hh, s[h + "1.mot_ffn.router.h2h.bias"])
    assert torch.equal(m.chunks[0].ffn_router.head.weight, s[h + "1.mot_ffn.router.router.weight"])
    assert torch.equal(m.bottom[0].attn.qkv.weight, s[h + "0.mot_attn.c_attn.weight"].t())
    assert torch.equal(m.anchors[0].ffn.fc.weight, s[h + "2.mot_ffn.c_fc.weight"].t())
    assert torch.equal(m.top[0].ffn.ln.bias, s[h + "3.mot_ffn.ffn_layernorm.bias"])
    assert torch.equal(m.wte.weight, s["transformer.wte.weight"])


def test_every_router_call_is_recorded_in_order():
    side, _ = loaded()
    ids = torch.randint(0, LAYOUT.vocab, (LAYOUT.batch, LAYOUT.seq))
    out = side.forward(ids)
    assert len(out["decisions"]) == len(va.decision_labels(LAYOUT)) == 2 * LAYOUT.depth
    assert all(d.shape == (ids.numel(), LAYOUT.top_k) for d in out["decisions"])
    assert va.first_mismatch(out["decisions"], out["decisions"], LAYOUT) is None


def test_first_mismatch_names_the_call_and_token():
    ours = [torch.zeros(8, 2, dtype=torch.long) for _ in range(4)]
    theirs = [t.clone() for t in ours]
    theirs[3][5] = torch.tensor([1, 0])  # ours chose module 0 twice there: a different set
    layout = va.Layout(seq=4, n_routed_blocks=1, depth=2, top_k=2)
    msg = va.first_mismatch(theirs, ours, layout)
    assert msg.startswith("routed block 0, step 1, FFN router, token (batch 1, position 1)")
    ours[3][5] = torch.tensor([0, 1])  # the order within the K chosen does not matter
    assert va.first_mismatch(theirs, ours, layout) is None


@pytest.mark.parametrize("change, words", [
    (lambda s: s.pop("transformer.h.1.mot_ffn.c_fc.2.bias"), "missing"),
    (lambda s: s.__setitem__("transformer.h.9.mot_attn.c_attn.weight", torch.zeros(1)),
     "unexpected"),
    (lambda s: s.__setitem__("transformer.ln_f.bias", torch.zeros(3)), "does not fit"),
])
def test_map_refuses_what_does_not_fit(change, words):
    side = va.MomdsSide()
    state = fake_state()
    change(state)
    with pytest.raises(va.BenchError, match=words):
        side.build(LAYOUT, state)


def run_bench(*args):
    return subprocess.run([sys.executable, str(REPO / "bench" / "vs_authors.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_authors_dir_without_their_model_is_one_clear_error(tmp_path):
    proc = run_bench("--authors-dir", str(tmp_path), "--authors-python", sys.executable)
    assert proc.returncode == 2
    assert "no mom/model.py" in proc.stderr and "git clone" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_interpreter_is_one_clear_error(tmp_path):
    (tmp_path / "mom").mkdir()
    (tmp_path / "mom" / "model.py").write_text("")
    proc = run_bench("--authors-dir", str(tmp_path))
    assert proc.returncode == 2 and "--make-venv DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_bench("--authors-dir", str(tmp_path), "--authors-python", str(tmp_path / "py"))
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_wrong_transformers_for_their_code_is_named_before_anything_runs(tmp_path):
    """This venv's transformers (5.x) as their interpreter: the version is the error, with the
    fix, not the import failure it would cause."""
    (tmp_path / "mom").mkdir()
    (tmp_path / "mom" / "model.py").write_text("")
    proc = run_bench("--authors-dir", str(tmp_path), "--authors-python", sys.executable)
    assert proc.returncode == 2 and "their code needs 4.40.x" in proc.stderr
    assert "--make-venv DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_layouts_their_code_cannot_express_are_refused():
    with pytest.raises(va.BenchError, match="fixed layer"):
        va.check_layout(va.Layout(n_attn=1))
    with pytest.raises(va.BenchError, match="TokenRouter"):
        va.check_layout(va.Layout(router="mlp", n_attn=4, n_ffn=2))
