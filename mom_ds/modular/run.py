"""What a modular run (modular.teacher set) changes in mom-train, which the command applies
(the training package knows nothing of it): the run's model: section becomes the teacher's,
read and checked before anything starts, and the model trained is the teacher's
ModularStudent."""
from __future__ import annotations

from ..config import RunConfig
from .student import ModularStudent
from .teacher import load_teacher, teacher_config


def resolve_teacher(run: RunConfig) -> None:
    """The model: section replaced by the teacher's (its weights left on disk), then the run
    and the granularities checked."""
    run.model = teacher_config(run.modular.teacher)
    run.validate()
    run.modular.resolve(run.model)


def build_student(run: RunConfig, resume: bool) -> ModularStudent:
    """The teacher's ModularStudent, the teacher's fingerprint recorded in the config so
    resume and mom-assemble can refuse another teacher. (`resume`: the student's modules
    come from the checkpoint then, as every trained weight does.)"""
    teacher = load_teacher(run.modular.teacher)
    run.modular.teacher_fingerprint = teacher.fingerprint
    return ModularStudent(teacher, run.modular, run.train.seed)
