"""What the commands share on their command lines: argument types (a bad value is
argparse's one-line error, exit 2, not a traceback or a silent no-op later), and the config
options of every command that builds or reads a config: `--section.key VALUE` overrides
(listed in --help with their types, choices and defaults) and `--print-config`."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import textwrap
import typing
from typing import Any, Iterator, Optional

# what a command's overrides may name: every field of RunConfig (mom-train)
EVERY_FIELD = ("model", "data", "train", "parallel", "modular")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must lie in (0, 1]")
    return value


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or cuda:N (default: auto, cuda when there is one)")


def device(name: str):
    """The torch device --device names; ConfigError for a GPU this machine does not have."""
    import torch

    from ..model import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device. Fix: cpu, cuda or cuda:N.") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA device. Fix: --device cpu.")
    return chosen


# --- config overrides and --print-config ---------------------------------------------------
def add_config_arguments(parser: argparse.ArgumentParser, reads: tuple[str, ...]) -> None:
    """--print-config, and --help's list of the `--section.key VALUE` overrides the command
    takes: the sections (`model`) and fields (`data.seq_len`) of `reads`."""
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML: the recipe or checkpoint with "
                             "the overrides applied) and exit")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the list's layout
    parser.epilog = override_help(reads)


def parse_command_line(parser: argparse.ArgumentParser, argv: Optional[list[str]]
                       ) -> tuple[argparse.Namespace, list[str]]:
    """The command's own arguments, and the overrides taken out of argv wherever they stand
    (before a positional argument too): every `--section.key VALUE` or
    `--section.key=VALUE`, known by the dot in its name, which no command option has.
    check_overrides checks them inside the command, so a bad one is its one-line error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, overrides, i = [], [], 0
    while i < len(argv):
        name = argv[i][2:].partition("=")[0] if argv[i].startswith("--") else ""
        take = 1 if "." not in name or "=" in argv[i] else 2
        (overrides if "." in name else own).extend(argv[i:i + take])
        i += take
    return parser.parse_args(own), overrides


def check_overrides(prog: str, overrides: list[str], reads: tuple[str, ...]) -> list[str]:
    """`overrides` once every one is a known field of the right type that `prog` reads;
    else ConfigError naming it (an override the command would ignore is refused)."""
    from ..config import ConfigError, parse_overrides

    for section, fields in parse_overrides(overrides, warn=False).items():
        for key in fields:
            if section not in reads and f"{section}.{key}" not in reads:
                raise ConfigError(f"--{section}.{key}: {prog} does not read it (the overrides "
                                  f"it takes: {', '.join(_patterns(reads)) or 'none'}). Fix: "
                                  f"drop it.")
    return overrides


def print_config(values: dict[str, Any]) -> int:
    """The resolved config on stdout as YAML (rank 0 alone under a launcher)."""
    import yaml

    if os.environ.get("RANK", "0") == "0":
        print(yaml.safe_dump(values, sort_keys=False), end="")
    return 0


@contextlib.contextmanager
def notes_to_stderr(active: bool) -> Iterator[None]:
    """Under --print-config, what resolving the config says (e.g. the vocab_size it took
    from the data) goes to stderr, so stdout is the YAML alone."""
    with contextlib.redirect_stdout(sys.stderr) if active else contextlib.nullcontext():
        yield


def override_help(reads: tuple[str, ...]) -> str:
    """Every override `reads` allows, with its type (a choice field: its choices), default and
    docstring."""
    from ..config import _section_classes, field_docs

    lines = ["config overrides (--section.key VALUE changes the config the command uses):"]
    for section, klass in _section_classes().items():
        docs, hints = field_docs(klass), typing.get_type_hints(klass)
        fields = [f for f in dataclasses.fields(klass)
                  if section in reads or f"{section}.{f.name}" in reads]
        if fields:
            lines.append(f"  {section}:")
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"    --{section}.{f.name} {value_help(hints[f.name])} "
                         f"(default {default!r})")
            lines += textwrap.wrap(docs.get(f.name, ""), 88, initial_indent=" " * 8,
                                   subsequent_indent=" " * 8)
    return "\n".join(lines)


def value_help(kind: Any) -> str:
    """`int`, `list[int]`, `{gru,mlp,fixed}` (a Literal's choices), `{gru,mlp,fixed,none}`
    (an optional one)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union:  # Optional[X]: X, or none
        inner = value_help(next(a for a in args if a is not type(None)))
        return inner[:-1] + ",none}" if inner.startswith("{") else f"{inner}|none"
    if typing.get_origin(kind) is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if args:
        return f"{kind.__origin__.__name__}[{','.join(value_help(a) for a in args)}]"
    return kind.__name__


def _patterns(reads: tuple[str, ...]) -> list[str]:
    return [f"--{r}.*" if "." not in r else f"--{r}" for r in reads]
