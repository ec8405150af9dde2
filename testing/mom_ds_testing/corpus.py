"""A real English corpus on every machine, for the benchmarks: the pydoc reference topics
and the standard library's docstrings (no download)."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

from data_prep.sources import BuiltinSource


def english_documents() -> list[str]:
    """English prose on every machine: the pydoc reference topics, and each built-in-corpus
    module's triple-quoted strings (mostly docstrings; a regex, since ast.parse of the
    standard library takes minutes on a small machine)."""
    from pydoc_data.topics import topics

    docs = list(topics.values())
    for path in BuiltinSource().files:
        strings = re.findall(r'"""(.*?)"""', path.read_text("utf-8", errors="replace"), flags=re.S)
        text = "\n\n".join(textwrap.dedent(s).strip() for s in strings)
        if len(text) > 200:
            docs.append(text)
    return docs


def write_corpus(path: Path, megabytes: float, docs: list[str]) -> None:
    budget = int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < budget:
            for doc in docs:
                written += f.write(json.dumps({"text": doc}) + "\n")
                if written >= budget:
                    break
