"""Recipes read strictly: a key given twice in one mapping is refused (PyYAML keeps the
last one without a word, so an edit below an older value silently loses), and a YAML
error is one line `FILE:LINE:COLUMN: problem. Fix: ...`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .model import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping holding one key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first, again = seen[key].start_mark, key_node.start_mark
                raise ConfigError(
                    f"{again.name}:{again.line + 1}: key {key!r} is given twice in one mapping "
                    f"(line {first.line + 1} column {first.column + 1}, line {again.line + 1} "
                    f"column {again.column + 1}); YAML would keep the second without a word. "
                    f"Fix: delete the one you do not mean.")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`; ConfigError naming the file, line and fix."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = err.problem or err.context or "not valid YAML"
        fix = ("indent with spaces, never tabs" if "'\\t'" in problem else
               "check the indentation and quoting on that line (a value holding ': ' or '#' "
               "needs quotes)")
        raise ConfigError(f"{where}: {problem}. Fix: {fix}.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({err}). Fix: correct the file.") from None
