"""The teacher of a modular run: found from `modular.teacher`, checked to be a plain stack
of vanilla layers (either block family), loaded frozen, and identified by a hash of its weights."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..model import ConfigError, MoMConfig, MoMForCausalLM
from ..model.weights_file import load_weights


def _kind(source: str) -> str:
    path = Path(source)
    if path.is_file():
        return "weights file"
    if (path / "config.json").is_file():
        return "hugging face"
    if path.is_dir():
        return "run"
    return "hub name"


def _run_parts(source: str) -> tuple[MoMConfig, dict[str, torch.Tensor]]:
    from ..checkpoints.loading import consolidated_state_dict, require_whole_model

    run, weights, _ = consolidated_state_dict(source)
    require_whole_model(run, source)  # a modular run's checkpoints hold modules only
    return run.model, weights


def _read(source: str, with_weights: bool) -> tuple[MoMConfig, dict[str, torch.Tensor]]:
    kind = _kind(source)
    try:
        if kind == "weights file":
            saved = load_weights(source, "modular.teacher")
            from ..config import stored_model_config

            return stored_model_config(saved.model_config), saved.state_dict
        if kind == "run":
            return _run_parts(source)
        from ..model.hf import from_hf, vanilla_config

        if not with_weights:
            return vanilla_config(source), {}
        model = from_hf(source)
        return model.config, model.state_dict()
    except ConfigError as err:
        if kind in ("weights file", "run"):
            raise
        # a Hugging Face source's own message (no known family, not to be had offline, ...)
        raise ConfigError(f"modular.teacher = {source!r} ({kind}): {err}") from None
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise ConfigError(f"modular.teacher = {source!r} ({kind}) cannot be read: {err}. Fix: "
                          f"name a mom-train run directory, a mom-convert .safetensors file, or a "
                          f"Hugging Face GPT-2 / Llama-family directory (hub names need the network).") from None


def check_vanilla(config: MoMConfig, source: str) -> None:
    if config.n_routed_blocks or config.mod_layer_indices() or config.n_top or config.n_bottom < 2:
        kind = "a MoM" if config.n_routed_blocks else "a Mixture-of-Depths" \
            if config.mod_layer_indices() else "not a plain"
        raise ConfigError(f"modular.teacher = {source!r} is {kind} model (n_bottom "
                          f"{config.n_bottom}, n_routed_blocks {config.n_routed_blocks}, n_top "
                          f"{config.n_top}, "
                          f"mod_capacity {config.mod_capacity}): Modular Transformers compress a "
                          f"stack of at least 2 vanilla layers. Fix: use a run of the "
                          f"vanilla preset or a Hugging Face GPT-2 / Llama-family model.")


def teacher_config(source: str) -> MoMConfig:
    """The teacher's model config, checked, without loading its weights where avoidable."""
    config, _ = _read(source, with_weights=False)
    check_vanilla(config, source)
    return config


def fingerprint(model: MoMForCausalLM) -> str:
    """sha256 over the names, shapes and fp32 bytes of every tensor: the teacher's identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().float().contiguous().cpu()
        digest.update(f"{name}{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]


def load_teacher(source: str, expected_fingerprint: str = "") -> MoMForCausalLM:
    """The frozen teacher in eval mode (no dropout). With an expected fingerprint, a teacher
    whose weights differ from the one a student was trained with is refused."""
    config, weights = _read(source, with_weights=True)
    check_vanilla(config, source)
    model = MoMForCausalLM(config)
    model.load_state_dict(weights)
    model.requires_grad_(False)
    found = fingerprint(model)
    if expected_fingerprint and found != expected_fingerprint:
        raise ConfigError(f"modular.teacher = {source!r} has weights {found}, but the student "
                          f"was trained with teacher {expected_fingerprint}: its modules belong "
                          f"to another teacher. Fix: name the teacher the run was trained from "
                          f"(--teacher), or start a new run.")
    model.fingerprint = found
    return model.eval()
