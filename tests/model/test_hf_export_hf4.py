"""The exports of test_hf_export.py, loaded by transformers 4.x (.venv-hf4, `make venv-hf4`:
transformers 4.44, the oldest mom-ds tests, beside .venv's torch) in a process without
mom_ds: the same logits, loss, greedy tokens and tokenizer as mom-ds, for every preset."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from data_prep.tokenizer import load_tokenizer
from data_prep.tokenizer_export import save_tokenizer, transformers_tokenizer
from test_hf_export import GPT2_TEXT, MODELS, check_same_outputs, export_and_load

VENV = Path(__file__).resolve().parents[2] / ".venv-hf4"


@pytest.fixture(scope="module")
def hf4_python() -> str:
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"{VENV.name} (transformers 4.x) is missing: `make venv-hf4` creates it")
    return str(python)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, hf4_python):
    root = tmp_path_factory.mktemp("exports_hf4")
    expected, got = export_and_load(root, hf4_python)
    # .venv's transformers 5 lies behind 4.x on that python's path: make sure 4.x ran
    assert got["version"].startswith("4."), f"{hf4_python} ran transformers {got['version']}"
    return root, expected, got


@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_with_transformers_4_and_matches(exported, name):
    root, expected, got = exported
    check_same_outputs(name, expected[name], got[name], root / name)


def test_gpt2_tokenizer_reads_the_same_under_transformers_4(hf4_python,
                                                          shared_gpt2_tokenizer_dir, tmp_path):
    """The GPT-2 tokenizer files written under transformers 5 give tiktoken's ids in 4.x."""
    ours = load_tokenizer(f"gpt2:{shared_gpt2_tokenizer_dir}")
    save_tokenizer(transformers_tokenizer(ours), tmp_path)
    script = ("import json, sys\nfrom transformers import AutoTokenizer\n"
              "t = AutoTokenizer.from_pretrained(sys.argv[1])\nids = t(sys.argv[2])['input_ids']\n"
              "print(json.dumps([ids, t.decode(ids), t.eos_token_id]))")
    proc = subprocess.run([hf4_python, "-c", script, str(tmp_path), GPT2_TEXT],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ids, text, eos = json.loads(proc.stdout.splitlines()[-1])
    assert (ids, text, eos) == (ours.encode(GPT2_TEXT).tolist(), GPT2_TEXT, 50256)
