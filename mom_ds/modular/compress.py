"""From a modular run to plain models: the student read back, an assembly chosen for a
compression ratio (a fixed rule or a search by held-out loss), and the assembled vanilla
model written as a checkpoint that mom-eval, mom-generate and mom-convert take."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from ..config import ModularConfig, RunConfig
from ..evaluation import row_windows, score
from ..model import ConfigError, MoMForCausalLM
from .assembly import FIXED_RULES, Assembly, check, describe, ratio, with_layers
from .student import ModularStudent
from .teacher import load_teacher

STRATEGIES = (*FIXED_RULES, "search")


def load_student(path: str | Path, teacher: Optional[str] = None
                 ) -> tuple[RunConfig, ModularStudent, int]:
    """A modular run's student (teacher + trained modules) on one process, in eval mode.
    `teacher` overrides the source recorded in the run; its weights must be the ones the
    student was trained with."""
    from ..checkpoints.loading import consolidated_state_dict

    run, weights, client = consolidated_state_dict(path)
    if not run.modular.enabled:
        raise ConfigError(f"{path} is not a modular run (its config has no modular.teacher). "
                          f"Fix: assemble from a run trained with a modular: section.")
    source = teacher or run.modular.teacher
    student = ModularStudent(load_teacher(source, run.modular.teacher_fingerprint),
                             run.modular, run.train.seed)
    prefix = "modular."
    try:
        student.modular.load_state_dict({k[len(prefix):]: v for k, v in weights.items()
                                         if k.startswith(prefix)})
    except RuntimeError as err:
        raise ConfigError(f"the modules in {path} do not fit teacher {source!r}: {err}. Fix: "
                          f"name the teacher the run was trained from.") from None
    return run, student.eval(), int(client["step"])


def assembled_model(student: ModularStudent, assembly: Assembly) -> MoMForCausalLM:
    """The vanilla model of the assembly's layers: the teacher's embeddings, final norm and
    head, and for each tile its teacher layer or module, copied."""
    check(assembly, student.n_layers, student.granularities)
    teacher = student.teacher
    config = dataclasses.replace(teacher.config, n_bottom=len(assembly))
    model = MoMForCausalLM(config)
    for name in ("wte", "wpe", "ln_f", "lm_head"):  # wpe: gpt2, lm_head: an untied head
        if getattr(teacher, name) is not None:
            getattr(model, name).load_state_dict(getattr(teacher, name).state_dict())
    for block, tile in zip(model.bottom, assembly):
        block.load_state_dict(student.layer(tile).state_dict())
    return model.eval()


def search_windows(run: RunConfig, n_windows: int) -> torch.Tensor:
    """The last n_windows windows of the val split (mom-eval and the benchmark score from
    the first ones), as int64 rows of seq_len + 1 tokens."""
    from ..data import TokenizedDataset

    data = TokenizedDataset(run.data.data_dir, split="val", seq_len=run.data.seq_len)
    n = min(n_windows, len(data))
    return torch.from_numpy(data.windows(range(len(data) - n, len(data))).astype("int64"))


def choose(student: ModularStudent, layers: int, strategy: str,
           rows: Optional[torch.Tensor] = None) -> tuple[Assembly, list[tuple[float, Assembly]]]:
    """(the assembly, and for `search` every candidate's held-out loss, best first)."""
    grains, n_layers = student.granularities, student.n_layers
    if strategy in FIXED_RULES:
        return FIXED_RULES[strategy](n_layers, grains, layers), []
    if strategy != "search":
        raise ConfigError(f"--strategy {strategy!r}: choose one of {STRATEGIES}")
    if rows is None:
        raise ConfigError("--strategy search needs held-out windows")
    windows = row_windows(rows, 8)

    def loss(assembly: Assembly) -> float:
        return score(lambda x, labels: student(x, labels=labels, assembly=assembly),
                     windows, device=next(student.parameters()).device).loss

    scored = sorted(((loss(a), a) for a in with_layers(n_layers, grains, layers)),
                    key=lambda s: s[0])
    return scored[0][1], scored


def write_assembled(run: RunConfig, model: MoMForCausalLM, assembly: Assembly, step: int,
                    out_dir: str | Path, strategy: str) -> Path:
    """out_dir as a one-checkpoint run directory (config.yaml, ckpt/latest) of the vanilla
    preset: what mom-eval, mom-generate and mom-convert read."""
    from ..checkpoints.format import write_weights

    out_dir = Path(out_dir)
    plain = RunConfig(model=model.config, data=run.data,
                      train=dataclasses.replace(run.train, out_dir=str(out_dir), init_from=""),
                      parallel=run.parallel, modular=ModularConfig())
    plain.save(out_dir / "config.yaml")
    weights = {n: p.detach().float() for n, p in model.named_parameters()}
    client = {"config": plain.to_dict(), "step": step,
              "assembly": {"tiles": [list(t) for t in assembly], "describe": describe(assembly),
                           "ratio": ratio(assembly), "strategy": strategy,
                           "teacher": run.modular.teacher,
                           "teacher_fingerprint": run.modular.teacher_fingerprint}}
    write_weights(out_dir / "ckpt", step, client, weights)
    return out_dir


def default_out(run_dir: str | Path, ratio_value: float, strategy: str) -> Path:
    return Path(run_dir) / "assembled" / f"ratio_{ratio_value:.3g}x_{strategy}"


