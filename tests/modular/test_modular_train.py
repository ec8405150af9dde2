"""Modular training end to end on one process: mom-train with a modular: section over a
vanilla teacher, resume, mom-assemble, and the assembled model through mom-eval and the
Hugging Face export. (Two ranks against one: test_train_multirank.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mom_ds.model.weights_file import save_weights
from mom_ds_testing.runs import metrics, mom_train, run_python, tiny_args, write_byte_data

pytestmark = pytest.mark.slow


def teacher_args(data: Path, out: Path) -> list[str]:
    """A 4-layer vanilla model of the tiny recipe's width."""
    return tiny_args(data, out, "--model.n_routed_blocks", "0", "--model.n_bottom", "4",
                     "--model.n_top", "0", "--train.max_steps", "30", "--train.ckpt_interval",
                     "0", "--train.eval_interval", "0")


def modular_args(data: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    return tiny_args(data, out, "--modular.teacher", str(teacher), "--train.max_steps", "8",
                     "--train.eval_interval", "8", "--train.ckpt_interval", "0", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modular")
    data = write_byte_data(root / "data")
    outs = {"data": data, "teacher": root / "teacher", "student": root / "student",
            "stopped": root / "stopped"}
    mom_train(*teacher_args(data, outs["teacher"]))
    mom_train(*modular_args(data, outs["student"], outs["teacher"]))
    stopped = modular_args(data, outs["stopped"], outs["teacher"])
    mom_train(*stopped, "--stop-after", "4")
    mom_train(*stopped, "--resume")
    return outs


def cli(module: str, *args: str):
    return run_python(["-m", f"mom_ds.cli.{module}", *args])


def test_modular_run_logs_each_loss_term_and_trains_the_modules(runs):
    rows = metrics(runs["student"])
    for step in range(1, 9):
        row = rows[step]
        total = row["train/lm_loss"] + row["train/kd_loss"] + row["train/hidden_loss"]
        assert row["train/loss"] == pytest.approx(total, rel=1e-5)  # weights 1, 1, 1
    assert any(rows[s]["train/kd_loss"] > 0 for s in range(1, 9))
    assert "eval/loss" in rows[8]
    saved = torch.load(runs["student"] / "ckpt" / "step_000008" / "dense.pt", weights_only=True)
    names = set(saved["params"])
    assert names and all(n.startswith("modular.g2.") for n in names)  # the teacher is not saved


def test_a_resumed_modular_run_draws_what_the_uninterrupted_run_drew(runs):
    want, got = metrics(runs["student"]), metrics(runs["stopped"])
    for step in range(1, 9):
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=1e-6), step


def test_assembled_models_evaluate_export_and_ratio_one_is_the_teacher(runs, tmp_path):
    student, teacher = runs["student"], runs["teacher"]
    listing = cli("assemble", str(student), "--list")
    assert listing.returncode == 0 and "--ratio 2  (2 layers, 1 assemblies)" in listing.stdout
    proc = cli("assemble", str(student), "--ratio", "1.33", "--strategy", "search",
               "--search-windows", "8", "--out", str(tmp_path / "r133"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("held-out loss") == 2  # t0 t1 g2[1] and g2[0] t2 t3
    assert cli("assemble", str(student), "--layers", "4", "--out",
               str(tmp_path / "r1")).returncode == 0

    def val_loss(run_dir: Path) -> str:
        proc = cli("evaluate", str(run_dir), "--max-windows", "16")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("val loss ")[1].split()[0]

    assert val_loss(tmp_path / "r1") == val_loss(teacher)
    val_loss(tmp_path / "r133")
    assert cli("convert", "to-hf", str(tmp_path / "r133"), str(tmp_path / "hf")).returncode == 0
    from transformers import GPT2LMHeadModel

    from mom_ds.checkpoints.loading import load_model

    _, model, _ = load_model(tmp_path / "r133")
    assert model.config.n_bottom == 3
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 257, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def save_model_file(model, path: Path) -> Path:
    """A model as mom-convert writes it (a teacher source)."""
    return save_weights(path, model.config.to_dict(), model.state_dict(), 0)


def test_modular_errors_name_the_cause(runs, tmp_path):
    from mom_ds.model import MoMForCausalLM
    from mom_ds.checkpoints.loading import load_model

    data, teacher = runs["data"], runs["teacher"]
    # a MoM model as teacher (the tiny recipe's, untrained)
    _, teacher_model, _ = load_model(runs["teacher"])
    mom_file = save_model_file(MoMForCausalLM(load_model_config("configs/tiny.yaml")),
                               tmp_path / "mom.safetensors")
    proc = cli("train", *modular_args(data, tmp_path / "x", mom_file))
    assert proc.returncode == 2 and "is a MoM model" in proc.stderr
    # a granularity that does not divide the teacher's layers
    proc = cli("train", *modular_args(data, tmp_path / "x", teacher,
                                      "--modular.granularities", "3"))
    assert proc.returncode == 2 and "[3] do not divide the teacher's 4 layers" in proc.stderr
    # tools that want a whole model, given the modules
    for args in (("evaluate", str(runs["student"])), ("convert", "fp32", str(runs["student"]),
                                                      str(tmp_path / "x.safetensors"))):
        proc = cli(*args)
        assert proc.returncode == 2 and "is a modular run" in proc.stderr and "mom-assemble" \
            in proc.stderr, args
    # a ratio no assembly meets
    proc = cli("assemble", str(runs["student"]), "--ratio", "3")
    assert proc.returncode == 2 and "offers: 1x (4 layers), 1.33x (3 layers), 2x" in proc.stderr
    # the modules of another teacher (the same shape, other weights): assembled with it, or
    # resumed against it; the run directory is left as it was
    with torch.no_grad():
        teacher_model.bottom[0].ffn.fc.bias.add_(1.0)
    other = save_model_file(teacher_model, tmp_path / "other_teacher.safetensors")
    proc = cli("assemble", str(runs["student"]), "--ratio", "2", "--teacher", str(other))
    assert proc.returncode == 2 and "belong to another teacher" in proc.stderr
    config_before = (runs["stopped"] / "config.yaml").read_text()
    proc = cli("train", *modular_args(data, runs["stopped"], other), "--resume")
    assert proc.returncode == 2 and "--resume: modular.teacher_fingerprint " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (runs["stopped"] / "config.yaml").read_text() == config_before


def load_model_config(recipe: str):
    from mom_ds.config import load_run_config

    return load_run_config(Path(__file__).resolve().parents[2] / recipe).model
