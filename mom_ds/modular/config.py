"""ModularConfig: the `modular:` section of a recipe (docs/modular.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..model.config import ConfigError, MoMConfig


@dataclass
class ModularConfig:
    """Modular Transformers: train modularized layers that each replace g consecutive layers
    of a frozen vanilla teacher, by multi-grained module replacing and distillation."""

    teacher: str = ""
    """Empty: an ordinary pre-training run. Otherwise the vanilla model to compress: a
    mom-train run directory (or its ckpt/ or a step_* tag), a .safetensors file written by
    mom-convert (fp32 or from-hf), a Hugging Face GPT-2 directory or hub name. The run's
    model: section becomes the teacher's."""
    granularities: list[int] = field(default_factory=list)
    """g values: one module per group of g consecutive teacher layers for each g; each must
    divide the teacher's layer count L and lie in [2, L]. Empty: every divisor of L in
    [2, L/2]."""
    replace_prob: float = 0.5
    """b in p = min(1, b + k * step), the chance that a position where modules' groups start
    takes a module instead of its teacher layer (BERT-of-Theseus: constant 0.7, or a
    curriculum from 0.1)."""
    replace_prob_slope: float = 0.0
    """k in the same formula, per optimizer step (BERT-of-Theseus' curriculum: 6e-4); 0 keeps
    p constant."""
    lm_weight: float = 1.0
    """Weight of the student's cross-entropy on the data."""
    kd_weight: float = 1.0
    """Weight of the logit distillation loss T^2 KL(teacher || student) at temperature T."""
    kd_temperature: float = 2.0
    """T of the logit distillation."""
    hidden_weight: float = 1.0
    """Weight of the mean squared error between the student's and the teacher's residual
    stream at the end of every module's group."""
    eval_granularity: int = 0
    """Validation scores the assembly of g-modules only (compression g); 0: the smallest
    granularity."""
    teacher_fingerprint: str = ""
    """Filled in by mom-train (a hash of the teacher's weights): resume and mom-assemble
    refuse a teacher whose weights differ. Leave empty."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)

    def validate(self) -> None:
        def fail(name: str, why: str, fix: str) -> None:
            raise ConfigError(f"modular.{name} = {getattr(self, name)!r}: {why}. Fix: {fix}.")

        if not 0.0 <= self.replace_prob <= 1.0:
            fail("replace_prob", "must lie in [0, 1]", "use e.g. 0.5, or 0.1 with a slope")
        for name in ("replace_prob_slope", "lm_weight", "kd_weight", "hidden_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                fail(name, "must be a non-negative number", f"set modular.{name} >= 0")
        if not (self.kd_temperature > 0 and math.isfinite(self.kd_temperature)):
            fail("kd_temperature", "must be positive", "use e.g. 2.0 (or 1.0)")
        if any(g < 2 for g in self.granularities):
            fail("granularities", "every granularity must be >= 2 (1 is the teacher layer)",
                 "list values such as [2, 3, 4, 6]")
        if self.eval_granularity < 0:
            fail("eval_granularity", "must not be negative", "use 0 or one of the granularities")

    def resolve(self, teacher: MoMConfig) -> tuple[int, ...]:
        """The granularities for this teacher, checked against its layer count."""
        n_layers = teacher.n_bottom
        grains = tuple(sorted(set(self.granularities))) or \
            tuple(g for g in range(2, n_layers // 2 + 1) if n_layers % g == 0)
        bad = [g for g in grains if n_layers % g or g > n_layers]
        if bad:
            divisors = [g for g in range(2, n_layers + 1) if n_layers % g == 0]
            raise ConfigError(f"modular.granularities = {list(self.granularities)}: {bad} do "
                              f"not divide the teacher's {n_layers} layers. Fix: use divisors "
                              f"of {n_layers}: {divisors}.")
        if not grains:
            raise ConfigError(f"modular.teacher has {n_layers} layers: no granularity in "
                              f"[2, L/2] divides it. Fix: list modular.granularities "
                              f"explicitly (e.g. [{n_layers}]) or use a deeper teacher.")
        if self.eval_granularity and self.eval_granularity not in grains:
            raise ConfigError(f"modular.eval_granularity = {self.eval_granularity} is not one "
                              f"of the granularities {list(grains)}. Fix: use one of them or 0.")
        return grains
