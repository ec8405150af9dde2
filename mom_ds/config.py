"""RunConfig: everything one `mom-train` run needs, as typed dataclasses.

A recipe is a YAML file with up to five sections, `model:` (MoMConfig), `data:`, `train:`,
`parallel:` and `modular:` (a Modular Transformers run, mom_ds/modular). Command-line overrides `--section.key value` are converted to the field's type
(a wrong type is an error, not a silently kept string). Every value is validated when the
config is built, so a bad run fails here, before DeepSpeed starts any process group.
The engine's side (ZeRO stage, precision, offload) lives in the DeepSpeed JSON that
`parallel.deepspeed` names; `mom_ds.train.engine` completes and cross-checks it.
"""
from __future__ import annotations

import ast
import dataclasses
import sys
import inspect
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .model import ConfigError, MoMConfig
from .model.checkpointing import MODES as CHECKPOINTING
from .strict_yaml import read_yaml

ModelConfig = MoMConfig
# choice fields are annotated Literal[CHOICES] (--help lists them; other values are refused)
PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "nccl", "gloo")
NAN_POLICIES = ("stop", "skip")
SPIKE_POLICIES = ("stop", "skip", "off")

# Renamed config keys, old -> new (one name per concept: docs/glossary.md). rename_keys applies
# this table wherever a config is read: a recipe (its sections and preset_args) or a
# --section.key override that uses an old key works, with one line on stderr; a stored
# config (a run directory's config.yaml, a checkpoint's, an exported model's) is read
# silently, since its owner cannot change it. Old and new key together are refused.
RENAMED_KEYS = {
    "model.n_chunks": "model.n_routed_blocks",
    "model.aux_loss_coef": "model.balance_loss_coef",
    "model.aux_loss_count_skip": "model.balance_loss_count_skip",
    "model.mod_aux_loss_coef": "model.mod_router_loss_coef",
}


@dataclass
class DataConfig:
    """Where the tokens come from (files written by `mom-prep`)."""

    data_dir: str = "data/builtin"
    """Directory with train.bin, val.bin and meta.json written by mom-prep."""
    seq_len: int = 256
    """Tokens per training window (the context length trained on; <= model.n_positions)."""
    seed: int = 1337
    """Seed of the window order; identical on every rank, each rank reads its own share."""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """Filled in by mom-train from data_dir (tokenizer, sizes and checksums of the splits):
    resume, mom-eval and mom-generate refuse other data unless --allow-data-change. Leave
    empty."""


@dataclass
class TrainConfig:
    """The optimisation recipe (defaults: the MoM authors' AdamW settings)."""

    out_dir: str = "runs/default"
    """Run directory: config.yaml, TensorBoard events (tb/) and checkpoints (ckpt/)."""
    max_steps: int = 1000
    """Optimizer steps to train for (the cosine schedule ends here)."""
    micro_batch_size: int = 8
    """Windows per rank per forward/backward (DeepSpeed's train_micro_batch_size_per_gpu)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step (DeepSpeed's gradient_accumulation_steps)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of the warmup."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay (nanoGPT: lr / 10)."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices; biases, LayerNorms and embeddings get none."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-5
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables; DeepSpeed's gradient_clipping)."""
    precision: Literal[PRECISIONS] = "auto"
    """auto (bf16 on a GPU that supports it, else fp32), bf16 or fp32."""
    seed: int = 1337
    """Seed of the model initialisation and of dropout."""
    init_from: str = ""
    """Weights to start from instead of a random init: a .safetensors file written by
    mom-convert (fp32 or from-hf, e.g. a GPT-2 donor cut into modules for two-stage
    training); ignored by --resume."""
    log_interval: int = 10
    """Steps between console lines and TensorBoard scalars."""
    eval_interval: int = 200
    """Steps between validation passes (and one at the end and at every checkpoint, which
    records its val loss); 0 evaluates only there."""
    eval_batches: int = 20
    """Micro-batches of val per rank in one validation pass (the same windows every time)."""
    ckpt_interval: int = 500
    """Steps between checkpoints (and one at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk (older ones are deleted after a new one is
    published, except the one with the best val loss); 0 keeps all."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0 detects it on known GPUs, and on CPU
    uses 1.0 (a documented placeholder: set it for your CPU)."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk of the LM head + cross-entropy in training and validation: the
    (tokens x vocab) logits are never whole in memory (each chunk's gradients are formed
    as its loss is, mom_ds/model/lm_loss.py); 0 builds them whole. Modular runs keep them whole (distillation reads them)."""
    activation_checkpointing: Literal[CHECKPOINTING] = "none"
    """Keep fewer activations and recompute them in the backward (torch.utils.checkpoint;
    the same dropout masks and routing come back): none, layer (each vanilla or MoD layer
    and each routing step of a routed block: the lowest peak) or block (each layer and
    each routed block whole: fewer saved boundaries, but a block's H steps are rebuilt
    together in the backward)."""
    compile: bool = False
    """torch.compile the parts of the model with no host sync: every vanilla and MoD layer
    and every learned router (docs/training.md says what and why). Not with ZeRO-3; dropout
    masks come from inductor's generator, so they differ from an eager run's."""
    profile_steps: list[int] = field(default_factory=list)
    """[start, end]: record optimizer steps start+1 .. end with torch.profiler into
    profile/ in the run directory (a TensorBoard / Perfetto trace per rank, the routed
    blocks' phases labelled); [] records nothing."""
    nan_policy: Literal[NAN_POLICIES] = "stop"
    """A step whose loss or gradient norm is not finite: stop (the run ends with exit 3
    before it writes a checkpoint) or skip (the step changes no weight, optimizer state or
    learning rate, as DeepSpeed skips fp16 overflow steps; needs bf16 or ZeRO stage >= 1)."""
    max_skipped_steps: int = 10
    """Under nan_policy skip, this many skipped steps in a row end the run as under stop."""
    spike_policy: Literal[SPIKE_POLICIES] = "stop"
    """A loss that stays finite but explodes (above spike_factor times its running mean
    for spike_steps optimizer steps in a row): stop (exit 3 before the next checkpoint,
    naming the last good and the best checkpoint), skip (go back to the last good
    checkpoint and skip the batches since it, PaLM's remedy; at most max_spike_skips
    times) or off."""
    spike_factor: float = 2.0
    """How far above its running mean (over about the last 100 steps, spikes left out)
    a step's training loss counts as a spike."""
    spike_steps: int = 3
    """Optimizer steps in a row above spike_factor x the running mean that make a spike."""
    max_spike_skips: int = 3
    """Under spike_policy skip, the spikes after which the run stops as under stop."""
    wandb_project: str = ""
    """Weights & Biases project that also receives every TensorBoard scalar and the config
    (pip install 'mom-ds[wandb]'; WANDB_MODE=offline needs no network); "" logs to
    TensorBoard and metrics.jsonl only. A resumed run continues the same W&B run."""


@dataclass
class ParallelConfig:
    """How processes cooperate."""

    deepspeed: str = "ds_configs/zero1.json"
    """DeepSpeed JSON (ZeRO stage, precision, offload); batch sizes, clipping and the
    optimizer are filled in from train.* and must agree where the JSON sets them."""
    backend: Literal[BACKENDS] = "auto"
    """Process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    timeout_minutes: float = 10.0
    """A collective that waits longer than this fails instead of hanging."""
    expert_parallel_size: int = 1
    """E: ranks that share the routed blocks' module pools. Each rank of an expert-parallel
    group holds and computes A/E attention and F/E FFN modules of every block; tokens reach
    them by all-to-all. Must divide the world size; a pool E does not divide, of one module,
    or behind a fixed router stays dense (data-parallel)."""


@dataclass
class ModularConfig:
    """Modular Transformers: train modularized layers that each replace g consecutive layers
    of a frozen vanilla teacher, by multi-grained module replacing and distillation."""

    teacher: str = ""
    """Empty: an ordinary pre-training run. Otherwise the vanilla model to compress: a
    mom-train run directory (or its ckpt/ or a step_* tag), a .safetensors file written by
    mom-convert (fp32 or from-hf), a Hugging Face GPT-2 or Llama-family directory or hub
    name. The run's model: section becomes the teacher's."""
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


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    modular: ModularConfig = field(default_factory=ModularConfig)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Value checks that need no files and no processes (the model checks itself)."""
        self.model.validate()
        self.modular.validate()
        d, t, p = self.data, self.train, self.parallel

        def fail(name: str, value: Any, why: str, fix: str) -> None:
            raise ConfigError(f"{name} = {value!r}: {why}. Fix: {fix}.")

        if not 1 <= d.seq_len <= self.model.n_positions:
            fail("data.seq_len", d.seq_len, f"must lie in [1, model.n_positions = "
                 f"{self.model.n_positions}]", "shorten data.seq_len or raise model.n_positions")
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches",
                     "max_skipped_steps", "spike_steps", "max_spike_skips"):
            if getattr(t, name) < 1:
                fail(f"train.{name}", getattr(t, name), "must be >= 1", f"set train.{name} >= 1")
        for name in ("warmup_steps", "log_interval", "eval_interval", "ckpt_interval",
                     "keep_checkpoints", "loss_chunk_tokens"):
            if getattr(t, name) < 0:
                fail(f"train.{name}", getattr(t, name), "must not be negative",
                     f"set train.{name} >= 0")
        if t.warmup_steps > t.max_steps:
            fail("train.warmup_steps", t.warmup_steps, f"exceeds train.max_steps = "
                 f"{t.max_steps}", "use a warmup shorter than the run")
        if not t.lr > 0:
            fail("train.lr", t.lr, "must be positive", "use e.g. 1e-3 (MoM authors) or 6e-4")
        if not 0 <= t.min_lr <= t.lr:
            fail("train.min_lr", t.min_lr, f"must lie in [0, train.lr = {t.lr}]",
                 "use e.g. train.lr / 10")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(t, name) < 1:
                fail(f"train.{name}", getattr(t, name), "must lie in [0, 1)", "use 0.9 / 0.95")
        for name in ("weight_decay", "grad_clip", "peak_tflops"):
            if getattr(t, name) < 0:
                fail(f"train.{name}", getattr(t, name), "must not be negative",
                     f"set train.{name} >= 0")
        if not t.eps > 0:
            fail("train.eps", t.eps, "must be positive", "use 1e-5 (MoM authors) or 1e-8")
        if t.precision not in PRECISIONS:
            fail("train.precision", t.precision, f"is not one of {PRECISIONS}",
                 "use auto, bf16 or fp32")
        if t.activation_checkpointing not in CHECKPOINTING:
            fail("train.activation_checkpointing", t.activation_checkpointing,
                 f"is not one of {CHECKPOINTING}", "use none, layer or block")
        if t.profile_steps and not (len(t.profile_steps) == 2
                                    and 0 <= t.profile_steps[0] < t.profile_steps[1]
                                    <= t.max_steps):
            fail("train.profile_steps", t.profile_steps, f"must be [start, end] with 0 <= "
                 f"start < end <= train.max_steps = {t.max_steps}", "use e.g. [10, 13] "
                 "(steps 11 to 13), or [] to record nothing")
        if t.nan_policy not in NAN_POLICIES:
            fail("train.nan_policy", t.nan_policy, f"is not one of {NAN_POLICIES}",
                 "use stop (the default) or skip")
        if t.spike_policy not in SPIKE_POLICIES:
            fail("train.spike_policy", t.spike_policy, f"is not one of {SPIKE_POLICIES}",
                 "use stop (the default), skip or off")
        if not t.spike_factor > 1:
            fail("train.spike_factor", t.spike_factor, "must be > 1",
                 "use e.g. 2 (a loss twice its running mean)")
        if p.backend not in BACKENDS:
            fail("parallel.backend", p.backend, f"is not one of {BACKENDS}",
                 "use auto, nccl or gloo")
        if not p.timeout_minutes > 0:
            fail("parallel.timeout_minutes", p.timeout_minutes, "must be positive",
                 "use e.g. 10")
        # the world size is checked in preflight, once the launcher has told it
        if p.expert_parallel_size < 1:
            fail("parallel.expert_parallel_size", p.expert_parallel_size, "must be >= 1",
                 "use 1 (no expert parallelism) or a divisor of the pool sizes")
        if t.init_from and not t.init_from.endswith(".safetensors"):
            fail("train.init_from", t.init_from, "is not a .safetensors file (mom-ds reads no "
                 "pickled weights: a pickle can run code when loaded)",
                 "write the weights with mom-convert fp32 or from-hf, which write safetensors")
        if self.modular.enabled and t.init_from:
            fail("train.init_from", t.init_from, "a modular run starts from modular.teacher",
                 "drop train.init_from (the modules are initialised from the teacher)")

    @classmethod
    def of_model(cls, model: ModelConfig, expert_parallel_size: int = 1) -> "RunConfig":
        """The defaults around a model built without a recipe (benchmarks, tests): windows
        of the model's full context, expert_parallel_size E."""
        return cls(model=model, data=DataConfig(seq_len=model.n_positions),
                   parallel=ParallelConfig(expert_parallel_size=expert_parallel_size))

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}. Fix: use only "
                              f"{sorted(sections)}.")
        built = {}
        for name, klass in _section_classes().items():
            raw = values.get(name) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"config section {name!r} must be a mapping, got {raw!r}.")
            raw = rename_keys(name, raw)  # a stored config of an earlier version: silently
            known = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(raw) - known)
            if bad:
                raise ConfigError(f"unknown {name} field(s) {bad}. Fix: use only "
                                  f"{sorted(known)}.")
            built[name] = klass(**{k: _coerce(name, k, v, klass) for k, v in raw.items()})
        return cls(**built)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def rename_keys(section: str, values: dict[str, Any], where: Optional[str] = None
                ) -> dict[str, Any]:
    """`values` (one section's keys) with every old key of RENAMED_KEYS under its new name.
    `where` names what a person wrote (a recipe, the command line): each old key found there
    prints one deprecation line to stderr; None reads a stored config silently. A key given
    under both names is a ConfigError."""
    out = dict(values)
    for old, new in RENAMED_KEYS.items():
        old_section, _, old_key = old.partition(".")
        if old_section != section or old_key not in out:
            continue
        new_key = new.partition(".")[2]
        if new_key in out:
            raise ConfigError(f"{where or 'the stored config'} sets both {old} (deprecated) "
                              f"and {new}. Fix: keep only {new}.")
        out[new_key] = out.pop(old_key)
        if where is not None and os.environ.get("RANK", "0") == "0":
            print(f"{old} is deprecated: it is {new} ({where})", file=sys.stderr, flush=True)
    return out


def stored_model_config(values: dict[str, Any]) -> MoMConfig:
    """The MoMConfig a model section stored by an earlier version describes (a weights
    file's, an exported model's config.json), old key names read silently."""
    return MoMConfig.from_dict(rename_keys("model", values))


def _section_classes() -> dict[str, type]:
    return {"model": MoMConfig, "data": DataConfig, "train": TrainConfig,
            "parallel": ParallelConfig, "modular": ModularConfig}


def _field_type(klass: type, key: str) -> Any:
    return typing.get_type_hints(klass)[key]


def _coerce(section: str, key: str, value: Any, klass: type) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or refuse it."""
    kind = _field_type(klass, key)
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    where = f"{section}.{key}"
    if typing.get_origin(kind) is list:  # a YAML list, or 2,3,4 / [2,3,4] on the command line
        items = value.strip("[] ").split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            item_kind = typing.get_args(kind)[0]
            return [_coerce_value(f"{where}[{i}]", item_kind, v) for i, v in enumerate(items)
                    if not (isinstance(v, str) and not v.strip())]
        raise ConfigError(f"{where} = {value!r}: expected a list. Fix: give e.g. [2, 3] in "
                          f"YAML or 2,3 on the command line.")
    return _coerce_value(where, kind, value)


def _coerce_value(where: str, kind: Any, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind in (int, float):
        numbers = int if kind is int else (int, float)  # an int field refuses 2.5, and 2.0
        if isinstance(value, numbers) and not isinstance(value, bool):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value in choices:
            return value
        raise ConfigError(f"{where} = {value!r}: is not one of {choices}. Fix: use one of "
                          f"{', '.join(choices)}.")
    elif typing.get_origin(kind) is dict:  # a record mom-train fills in (data.fingerprint)
        if isinstance(value, dict):
            return value
    else:  # no other field types exist; a new one must be taught here
        raise ConfigError(f"{where}: unsupported field type {kind}")
    raise ConfigError(f"{where} = {value!r}: expected {kind.__name__}. Fix: give a "
                      f"{kind.__name__} value.")


def parse_overrides(args: list[str], warn: bool = True) -> dict[str, dict[str, Any]]:
    """`--section.key value` pairs (or `--section.key=value`) -> {section: {key: value}},
    with each value converted to the field's type and each old key renamed (RENAMED_KEYS;
    warn=False leaves the deprecation line to the parse that uses the values)."""
    classes = _section_classes()
    out: dict[str, dict[str, Any]] = {}
    spelled: dict[tuple[str, str], str] = {}  # (section, key) -> the name it was given as
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}. Fix: overrides look like "
                              f"--train.lr 3e-4 (section.key value).")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value. Fix: --{name} VALUE.")
            value = args[i + 1]
            i += 1
        i += 1
        section, _, key = name.partition(".")
        if section not in classes:
            raise ConfigError(f"override --{name}: unknown section {section!r}. Fix: use "
                              f"one of {sorted(classes)}.")
        renamed = next(iter(rename_keys(section, {key: None},
                                            "the command line" if warn else None)))
        before = spelled.setdefault((section, renamed), key)
        if before != key:  # a renamed key given under its old and its new name
            old = before if before != renamed else key
            raise ConfigError(f"the command line sets both --{section}.{old} (deprecated) "
                              f"and --{section}.{renamed}. Fix: keep only --{section}.{renamed}.")
        key = renamed
        fields = {f.name for f in dataclasses.fields(classes[section])}
        if key not in fields:
            raise ConfigError(f"override --{name}: {section} has no field {key!r}. Fix: use "
                              f"one of {sorted(fields)}.")
        out.setdefault(section, {})[key] = _coerce(section, key, value, classes[section])
    return out


def load_run_config(path: Optional[str | Path], overrides: list[str] = ()) -> RunConfig:
    """YAML recipe (or defaults when path is None) plus command-line overrides, validated."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist. Fix: pass a recipe such "
                              f"as configs/tiny.yaml.")
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections.")
        values = _renamed_recipe(values, str(path))
    given = any("vocab_size" in (values.get(key) or {}) for key in ("model", "preset_args"))
    parsed = parse_overrides(list(overrides))
    values = _merge(_expand_preset(values), parsed)
    if not (given or "vocab_size" in parsed.get("model", {})):
        _vocab_from_data(values)
    return RunConfig.from_dict(values)


def _renamed_recipe(values: dict[str, Any], where: str) -> dict[str, Any]:
    """A recipe's sections (and its preset_args, a preset's model arguments) with old keys
    renamed, each named in one deprecation line."""
    out = dict(values)
    for section in (*_section_classes(), "preset_args"):
        if isinstance(out.get(section), dict):
            preset = section == "preset_args"
            out[section] = rename_keys("model" if preset else section, out[section],
                                       f"{where}, preset_args" if preset else where)
    return out


def with_overrides(run: RunConfig, overrides: list[str]) -> RunConfig:
    """A config already built (a checkpoint's) changed by `--section.key VALUE` overrides,
    validated again as a whole."""
    return RunConfig.from_dict(_merge(run.to_dict(), parse_overrides(list(overrides))))


def _merge(values: dict[str, Any], parsed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {**values, **{section: {**(values.get(section) or {}), **updates}
                         for section, updates in parsed.items()}}


def _vocab_from_data(values: dict[str, Any]) -> None:
    """model.vocab_size left unset: the data's tokenizer vocabulary padded up to a multiple of
    64, as nanoGPT pads GPT-2's 50257 to 50304 (whole tiles for the embedding and head
    matmuls), said in one line. Data that cannot be read keeps the default: mom-train's
    data check then says what is wrong with it."""
    from data_prep.format import DataError, read_meta

    data_dir = (values.get("data") or {}).get("data_dir", DataConfig.data_dir)
    try:
        vocab = int(read_meta(data_dir)["tokenizer"]["vocab_size"])
    except (DataError, TypeError, ValueError):  # meta.json unreadable, or a vocab_size not a number
        return
    padded = -(-vocab // 64) * 64
    values["model"] = {**(values.get("model") or {}), "vocab_size": padded}
    if os.environ.get("RANK", "0") == "0":
        print(f"model.vocab_size = {padded}: the tokenizer of {data_dir} has {vocab} tokens, padded up "
              f"to a multiple of 64 (set model.vocab_size to choose)", flush=True)


def _expand_preset(values: dict[str, Any]) -> dict[str, Any]:
    """A recipe may name its model by preset (`preset: moe` and `preset_args: {n_layer: 12,
    ...}`, as the files under configs/presets/ do): the preset builds the model section,
    and fields the recipe's own `model:` section sets win over it."""
    name, args = values.pop("preset", None), values.pop("preset_args", None) or {}
    if name is None:
        if args:
            raise ConfigError("the recipe has preset_args but no preset. Fix: add "
                              "`preset: NAME` or remove preset_args.")
        return values
    from .model.presets import PRESETS, preset

    if not isinstance(args, dict):
        raise ConfigError(f"preset_args must be a mapping of arguments, got {args!r}.")
    try:
        built = preset(str(name), **args)
    except TypeError as err:  # an argument the preset function does not take
        raise ConfigError(f"preset {name!r}: {err}. Fix: see mom_ds/model/presets.py for "
                          f"the arguments of {sorted(PRESETS)}.") from None
    return {**values, "model": {**built.to_dict(), **(values.get("model") or {})}}


def load_deepspeed_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parallel.deepspeed = {str(path)!r}: file not found. Fix: use one "
                          f"of ds_configs/zero0.json .. zero3.json.")
    try:
        values = json.loads(path.read_text(), object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as err:
        raise ConfigError(f"parallel.deepspeed = {str(path)!r} is not valid JSON: {err}") \
            from None
    except _DuplicateKey as err:
        raise ConfigError(f"parallel.deepspeed = {str(path)!r} gives the key {err.args[0]!r} "
                          f"twice in one object; JSON readers keep the last without a word. "
                          f"Fix: delete the one you do not mean.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"parallel.deepspeed = {str(path)!r} holds a JSON "
                          f"{type(values).__name__}, not an object of DeepSpeed settings. "
                          f"Fix: start from ds_configs/zero1.json.")
    return values


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(key)
    return dict(pairs)


def field_docs(klass: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal under the field), for the README."""
    body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore
    return docs


def reference_markdown(sections: tuple[str, ...] = ("model", "data", "train", "parallel",
                                                   "modular")) -> str:
    """The README's config reference: one table per section, from the field docstrings.
    `python -m mom_ds.config data train parallel` prints what the Training section holds."""
    lines = []
    for section, klass in _section_classes().items():
        if section not in sections:
            continue
        docs = field_docs(klass)
        lines += [f"`{section}:`", "", "| field | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(klass):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{f.name}` | `{default!r}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(reference_markdown(tuple(sys.argv[1:]) or ("model", "data", "train", "parallel",
                                                      "modular")))
