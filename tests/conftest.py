import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def own_environment():
    """Each test's changes to os.environ end with it. mom-train's main, called in-process,
    makes its process rank 0 of 1 (RANK, MASTER_ADDR=127.0.0.1, a MASTER_PORT): leaked, a
    later test's two-node Slurm job inherited them and its second node waited for a master
    on its own loopback."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The prepared test corpus (the built-in corpus as bytes, through mom-prep), made once
    per pytest session and shared by every test that trains the tiny recipe: read-only
    (a test that changes its data directory makes its own with write_byte_data)."""
    from mom_ds_testing.runs import write_byte_data

    return write_byte_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def shared_gpt2_tokenizer_dir() -> Path:
    """../shared/data/gpt2-tokenizer (real GPT-2 vocab + merges); skip where it is absent."""
    path = SHARED / "data" / "gpt2-tokenizer"
    if not (path / "vocab.json").is_file():
        pytest.skip("../shared/data/gpt2-tokenizer is not beside this checkout")
    return path
