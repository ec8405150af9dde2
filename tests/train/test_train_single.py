"""One-rank mom-train end to end: the loss falls, an interrupted run resumes exactly, a
checkpoint write killed midway leaves the previous checkpoint published, TensorBoard holds
the named scalars and histograms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mom_ds_testing.runs import metrics, mom_train, run_python, tiny_args

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("reference")
    mom_train(*tiny_args(data, out))
    return out


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    tag = (out / "ckpt" / "latest").read_text().strip()
    assert tag == f"step_{STEPS:06d}"
    states = torch.load(out / "ckpt" / tag / "dense.pt", weights_only=True)
    return {name: entry["weight"] for name, entry in states["params"].items()}


def assert_same_run(resumed: Path, reference: Path, first_step: int) -> None:
    got, want = metrics(resumed), metrics(reference)
    for step in range(first_step, STEPS + 1):
        assert got[step]["train/loss"] == want[step]["train/loss"], step
        assert got[step]["train/lr"] == want[step]["train/lr"], step
    assert got[STEPS]["eval/loss"] == want[STEPS]["eval/loss"]
    assert got[STEPS]["train/tokens_seen"] == want[STEPS]["train/tokens_seen"]
    a, b = final_weights(resumed), final_weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.smoke  # the end-to-end run `make test-fast` keeps (docs/testing.md)
def test_loss_decreases(reference):
    rows = metrics(reference)
    assert rows[STEPS]["train/lm_loss"] < rows[1]["train/lm_loss"] - 1.0
    assert rows[STEPS]["eval/loss"] < rows[6]["eval/loss"]
    assert (reference / "config.yaml").is_file()


def test_stop_and_resume_equals_uninterrupted(data, reference, tmp_path):
    mom_train(*tiny_args(data, tmp_path), "--stop-after", "6")
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_000006"
    proc = mom_train(*tiny_args(data, tmp_path), "--resume")
    assert "resumed from step 6" in proc.stdout
    assert_same_run(tmp_path, reference, first_step=7)


# the tiny recipe in the llama block family: rotary positions, grouped-query attention,
# SwiGLU, RMSNorm, an untied head
LLAMA = ["--model.block", "llama", "--model.n_kv_heads", "2", "--model.tie_word_embeddings",
         "false"]


def test_a_llama_run_resumes_exactly(data, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    mom_train(*tiny_args(data, reference, *LLAMA))
    mom_train(*tiny_args(data, resumed, *LLAMA), "--stop-after", "6")
    proc = mom_train(*tiny_args(data, resumed, *LLAMA), "--resume")
    assert "resumed from step 6" in proc.stdout
    assert_same_run(resumed, reference, first_step=7)
    assert "lm_head.weight" in final_weights(resumed)
    rows = metrics(reference)
    assert rows[STEPS]["train/lm_loss"] < rows[1]["train/lm_loss"] - 1.0


KILL_DURING_SAVE = """
import os, sys, torch
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if "step_000008" in str(f):  # one file of checkpoint 8 is on disk: die now
        os._exit(17)
torch.save = dying_save
from mom_ds.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_checkpoint_killed_midway_keeps_previous(data, reference, tmp_path):
    script = tmp_path / "dying_train.py"
    script.write_text(KILL_DURING_SAVE)
    out = tmp_path / "run"
    proc = run_python([str(script), *tiny_args(data, out)])
    assert proc.returncode == 17, proc.stderr[-2000:]
    ckpt = out / "ckpt"
    assert (ckpt / "step_000008").is_dir()  # half written ...
    assert (ckpt / "latest").read_text() == "step_000004"  # ... and not published
    proc = mom_train(*tiny_args(data, out), "--resume")
    assert "resumed from step 4" in proc.stdout
    assert_same_run(out, reference, first_step=5)


def test_tensorboard_holds_named_scalars_and_histograms(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for name in ("train/loss", "train/lm_loss", "train/lr", "train/grad_norm",
                 "perf/tokens_per_s", "perf/flops_per_s", "perf/mfu", "perf/memory_gb",
                 "eval/loss", "eval/ppl", "eval/flops_per_token",
                 "routing/block0/attn_skip_rate",
                 "routing/block0/ffn_skip_rate", "routing/block0/mean_path_length",
                 "routing/block0/balance_loss", "train/balance_loss", "train/mod_router_loss"):
        assert name in scalars, name
    assert not any("aux_loss" in tag or "depth" in tag for tag in scalars)
    assert len(acc.Scalars("train/loss")) == STEPS
    histograms = set(acc.Tags()["histograms"])
    assert "routing/block0/path_length" in histograms
    depth = 4  # configs/tiny.yaml
    for half in ("attn", "ffn"):
        for h in range(depth):
            assert f"routing/block0/{half}_usage_step{h}" in histograms
    event = acc.Histograms("routing/block0/ffn_usage_step0")[-1].histogram_value
    # every token made one choice among the 4 modules + SKIP, over 8 windows x 64 tokens
    assert len(event.bucket) == 5 and sum(event.bucket) == 8 * 64


def test_eval_and_generate_commands(reference):
    """mom-eval is the run's own evaluator: by default it scores the windows the run's last
    validation scored, in the same micro-batches, and gives its loss exactly (the float the
    run recorded, not a rounding of it)."""
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(reference)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"step {STEPS}: val loss ") and "(16 windows" in line
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(reference), "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scored["step"] == STEPS and scored["windows"] == 16
    assert scored["loss"] == metrics(reference)[STEPS]["eval/loss"]  # exactly
    # the forward FLOPs of the routing the windows took: the same evaluator's, the same count
    assert scored["flops_per_token"] == metrics(reference)[STEPS]["eval/flops_per_token"]
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(reference), "--all"])
    assert proc.returncode == 0 and "(458 windows" in proc.stdout, proc.stdout
    proc = run_python(["-m", "mom_ds.cli.generate", str(reference), "--prompt", "def ",
                       "--max-new-tokens", "20"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("def ")


def test_convert_fp32_to_hf_and_back(data, tmp_path):
    from transformers import GPT2LMHeadModel

    from mom_ds import MoMConfig, MoMForCausalLM
    from mom_ds.model.weights_file import load_weights

    vanilla = ["--model.n_routed_blocks", "0", "--model.n_bottom", "2", "--model.n_top", "0",
               "--train.max_steps", "2", "--train.warmup_steps", "1"]
    run_dir = tmp_path / "vanilla"
    mom_train(*tiny_args(data, run_dir), *vanilla)
    assert run_python(["-m", "mom_ds.cli.convert", "fp32", str(run_dir),
                       str(tmp_path / "v.safetensors")]).returncode == 0
    saved = load_weights(tmp_path / "v.safetensors", "test")
    assert saved.step == 2
    model = MoMForCausalLM(MoMConfig.from_dict(saved.model_config)).eval()
    model.load_state_dict(saved.state_dict)
    proc = run_python(["-m", "mom_ds.cli.convert", "to-hf", str(run_dir), str(tmp_path / "hf")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids).logits, atol=1e-5)
    proc = run_python(["-m", "mom_ds.cli.convert", "from-hf", str(tmp_path / "hf"),
                       str(tmp_path / "back.safetensors")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = load_weights(tmp_path / "back.safetensors", "test").state_dict
    for name, value in saved.state_dict.items():
        assert torch.allclose(back[name], value), name
    # and a run starts from it
    out = tmp_path / "stage2"
    mom_train(*tiny_args(data, out), *vanilla,
              "--train.init_from", str(tmp_path / "back.safetensors"))
    assert metrics(out)[1]["train/lm_loss"] < metrics(run_dir)[1]["train/lm_loss"]


def test_a_mom_run_exports_to_hf_and_imports_back(data, reference, tmp_path):
    """to-hf of a MoM run (remote code, the run's tokenizer), then from-hf of that directory:
    the same tensors, read back without running the exported code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mom_ds.model.weights_file import load_weights
    from mom_ds.checkpoints.loading import load_model

    proc = run_python(["-m", "mom_ds.cli.convert", "to-hf", str(reference), str(tmp_path / "hf")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, model, _ = load_model(reference)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = torch.tensor([tokenizer("def main(argv):\n    return 0")["input_ids"]])
    assert ids.tolist()[0] == list("def main(argv):\n    return 0".encode())  # bytes data
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    proc = run_python(["-m", "mom_ds.cli.convert", "from-hf", str(tmp_path / "hf"),
                       str(tmp_path / "back.safetensors")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = load_weights(tmp_path / "back.safetensors", "test")
    assert back.model_config == model.config.to_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict[name], value), name
    # into a directory that holds something: one error, the directory as it was
    proc = run_python(["-m", "mom_ds.cli.convert", "to-hf", str(reference), str(tmp_path / "hf")])
    assert proc.returncode == 2 and "not an empty directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    # a pickled weights file is refused before training starts
    torch.save({"state_dict": {}}, tmp_path / "old.pt")
    proc = run_python(["-m", "mom_ds.cli.train", *tiny_args(data, tmp_path / "x"),
                       "--train.init_from", str(tmp_path / "old.pt")])
    assert proc.returncode == 2 and "not a .safetensors file" in proc.stderr


def test_bf16_follows_fp32(data, reference, tmp_path):
    """DeepSpeed's bf16 path (bf16 weights and activations, fp32 master weights): emulated
    on CPU, so only 3 steps; bf16 keeps 8 bits of mantissa, hence 1e-2."""
    mom_train(*tiny_args(data, tmp_path), "--train.precision", "bf16", "--stop-after", "3")
    got, want = metrics(tmp_path), metrics(reference)
    for step in (1, 2, 3):
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=1e-2)
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(tmp_path), "--max-windows", "8"])
    assert proc.returncode == 0, proc.stderr[-2000:]
