"""The one weights-file format mom-ds writes and reads outside its checkpoints: safetensors
(no pickle, so a file a user downloaded cannot run code when loaded) with the model's
config and the step in the file's metadata.

Written by `mom-convert fp32 / from-hf`, read by `--train.init_from` and `modular.teacher`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from ..files import replaced
from .config import ConfigError

SUFFIX = ".safetensors"


class Weights(NamedTuple):
    model_config: dict
    state_dict: dict[str, torch.Tensor]
    step: int


def save_weights(path: str | Path, model_config: dict, state_dict: dict[str, torch.Tensor],
                 step: int) -> Path:
    """Write a temporary file and rename it: a killed conversion leaves no half file under the
    real name."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise ConfigError(f"{path}: weights are written as safetensors. Fix: name the file "
                          f"{path.with_suffix(SUFFIX).name}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors stores each tensor once, whole: no views into a larger storage
    tensors = {name: t.detach().contiguous().clone() for name, t in state_dict.items()}
    with replaced(path) as tmp:
        save_file(tensors, str(tmp), metadata={"model_config": json.dumps(model_config),
                                               "step": str(int(step))})
    return path


def load_weights(path: str | Path, what: str) -> Weights:
    """The weights in `path`; `what` names the setting that gave it, for the error."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != SUFFIX:
        raise ConfigError(f"{what} = {str(path)!r} is not a .safetensors file. mom-ds reads no "
                          f"pickled weights (a pickle can run code when loaded). Fix: write the "
                          f"weights with mom-convert (fp32 or from-hf), which writes safetensors.")
    if not path.is_file():
        raise ConfigError(f"{what} = {str(path)!r} does not exist. Fix: write it with "
                          f"mom-convert fp32 RUN {path.name} or mom-convert from-hf DIR "
                          f"{path.name}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
        return Weights(json.loads(meta["model_config"]), state, int(meta.get("step", 0)))
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise ConfigError(f"{what} = {str(path)!r} cannot be read as mom-convert weights "
                          f"({type(err).__name__}: {err}). Fix: write it again with "
                          f"mom-convert.") from None
