"""The DeepSpeed JSON checked by DeepSpeed's own config parser before any process group
exists: an unknown key (`zero_optimisation`), a block of the wrong type (`"bf16": true`)
or a value DeepSpeed's pydantic models refuse (ZeRO stage 4) is one ConfigError naming the
key, instead of a traceback on every rank or a setting silently ignored.

The known top-level keys are the ones DeepSpeedConfig reads: it is run once over a dict
that records every key asked for, so the list follows the installed DeepSpeed.

`"auto"` values (the Hugging Face Trainer's convention: "fill this in from the training
arguments") are resolved from the recipe first (resolve_auto), so a JSON kept from the
Trainer works as it is; the values they become are then checked like any other.
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
from typing import TYPE_CHECKING, Any

from ..config import ConfigError

if TYPE_CHECKING:
    from ..config import RunConfig

AUTO = "auto"
# what DeepSpeedConfig needs to parse a JSON that leaves the batch sizes to mom-train
_BATCH = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
_FILLED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# read by DeepSpeed outside its config parser, once a process group exists
_READ_ELSEWHERE = {"sequence_parallel_size"}


class _Recorder(dict):
    """A dict that remembers every key looked up in it, however it is looked up."""

    def __init__(self, values: dict[str, Any], asked: set[str]):
        super().__init__(values)
        self.asked = asked

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)

    def __getitem__(self, key: str) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def keys(self):  # `KEY in param_dict.keys()` is how DeepSpeed asks for some blocks
        asked = self.asked

        class Keys(set):
            def __contains__(self, key: object) -> bool:
                asked.add(str(key))
                return super().__contains__(key)

        return Keys(super().keys())

    def copy(self) -> "_Recorder":
        return _Recorder(self, self.asked)

    def __copy__(self) -> "_Recorder":
        return self.copy()


def _parse(cfg: dict[str, Any]) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs its world size at INFO
    try:
        DeepSpeedConfig(cfg)
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=None)
def _minimal_keys() -> frozenset[str]:
    asked: set[str] = set()
    _parse(_Recorder(dict(_BATCH), asked))
    return frozenset(asked)


def check_deepspeed_json(ds_json: Any, where: str) -> None:
    """ConfigError naming the first key of `ds_json` that DeepSpeed does not know or refuses."""
    if not isinstance(ds_json, dict):
        raise ConfigError(f"{where} holds a JSON {type(ds_json).__name__}, not an object of "
                          f"DeepSpeed settings. Fix: start from ds_configs/zero1.json.")
    settings = {k: v for k, v in ds_json.items() if k not in _FILLED}
    asked = set(_minimal_keys()) | _READ_ELSEWHERE
    try:  # a block can make DeepSpeed read further keys: those are known too
        _parse(_Recorder({**settings, **_BATCH}, asked))
        failure = None
    except Exception as err:  # noqa: BLE001 - DeepSpeed raises all kinds; named below
        failure = err
    for key in ds_json:
        if key not in asked:
            close = difflib.get_close_matches(key, sorted(asked), 3)
            raise ConfigError(f"{where}: DeepSpeed reads no key {key!r}, so it would be "
                              f"ignored. Fix: {_did_you_mean(close)}see "
                              f"deepspeed.ai/docs/config-json.")
    if failure is None:
        return
    for key, value in settings.items():  # the first key that fails alone is the one named
        try:
            _parse({key: value, **_BATCH})
        except Exception as err:  # noqa: BLE001
            problem, close = _reason(key, value, err)
            raise ConfigError(f"{where}: {problem}. Fix: {_did_you_mean(close)}see "
                              f"ds_configs/*.json and deepspeed.ai/docs/config-json.") from None
    raise ConfigError(f"{where}: DeepSpeed refuses these settings together "
                      f"({_first_line(failure)}). Fix: change one of them.")


def auto_values(run: "RunConfig", filled: dict[str, Any], bf16: bool) -> dict[str, Any]:
    """What `"auto"` stands for at each key (dotted path) it may appear at: the values
    mom-train fills in (`filled`: batch sizes, clipping), the precision it chose, the AdamW
    settings of train.*, and the ZeRO buckets sized from model.d_model as the Trainer sizes
    them from the hidden size (transformers' HfTrainerDeepSpeedConfig)."""
    t, width = run.train, run.model.d_model
    return {**filled, "bf16.enabled": bf16, "fp16.enabled": False, "amp.enabled": False,
            "optimizer.params.lr": t.lr, "optimizer.params.betas": [t.beta1, t.beta2],
            "optimizer.params.eps": t.eps, "optimizer.params.weight_decay": t.weight_decay,
            "zero_optimization.reduce_bucket_size": width * width,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * width * width),
            "zero_optimization.stage3_param_persistence_threshold": 10 * width}


def resolve_auto(ds_json: Any, values: dict[str, Any], where: str) -> Any:
    """`ds_json` with every `"auto"` replaced by its value in `values` (auto_values);
    ConfigError naming an `"auto"` the recipe has no value for."""
    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {key: walk(value, f"{path}.{key}" if path else key)
                    for key, value in node.items()}
        if node != AUTO:
            return node
        if path not in values:
            raise ConfigError(f'{where}: {path} = "auto", but mom-train has nothing in the '
                              f'recipe to fill it with ("auto" is resolved at '
                              f'{", ".join(sorted(values))}). Fix: give {path} a value or '
                              f'remove it.')
        return values[path]

    return walk(ds_json, "")


def _did_you_mean(close: list[str]) -> str:
    return f"did you mean {' or '.join(map(repr, close))}? Else " if close else ""


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _reason(key: str, value: Any, err: Exception) -> tuple[str, list[str]]:
    """What DeepSpeed refuses in `key`, and the close field names of a misspelt one."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = [str(part) for part in first["loc"]]
        path = ".".join(loc if loc[:1] == [key] else [key, *loc])
        close = []
        if first["type"] == "extra_forbidden" and len(loc) == 1:
            close = difflib.get_close_matches(loc[0], _model_fields(err.title), 3)
        return f"{path}: {first['msg']} (got {json.dumps(first['input'], default=str)})", close
    if not isinstance(value, dict) and ("mapping" in str(err) or
                                        isinstance(err, AttributeError)):
        return (f"{key} must be an object of settings {{...}}, not "
                f"{json.dumps(value, default=str)}"), []
    return f"{key}: {_first_line(err)}", []
def _model_fields(title: str) -> list[str]:
    """The field names (and aliases) of DeepSpeed's pydantic config model named `title`."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    models, names = [DeepSpeedConfigModel], []
    while models:
        model = models.pop()
        models += model.__subclasses__()
        if model.__name__ == title:
            for name, info in model.model_fields.items():
                names += [name] + ([info.alias] if info.alias else [])
    return names
