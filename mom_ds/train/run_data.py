"""The data a run was trained on: its fingerprint (recorded as data.fingerprint in the run's
config, so in every checkpoint and in config.yaml) and its tokenizer (copied into the run
directory), so that a resume, mom-eval and mom-generate never use other data without a word.

The fingerprint holds the tokenizer's identity (meta.json's spec, kind, vocabulary size and
end-of-text id, and the sha256 of its local files: a trained tokenizer.json, a gpt2:DIR or
a tokenizer path) and, per split, the file's size, the sha256 meta.json records (mom-prep
hashes each split as it writes it) and a hash of SAMPLE_BLOCKS blocks read across the file.
Hashing the whole of a split at every start costs minutes (OpenWebText's train.bin is
17 GB); the sampled blocks cost one megabyte and tell a file replaced behind meta.json's
back (another file of the same size is caught unless it differs only between the blocks).
No modification time enters it: a copied data directory is the same data.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from ..files import sha256_file
from data_prep.format import FORMAT_VERSION, META_FILE, SPLITS, DataError, bin_path, read_meta

TOKENIZER_DIR = "tokenizer"  # in the run directory
# the files of a tokenizer directory (Hugging Face or GPT-2's own); a model's weights beside
# them are not the tokenizer's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
SAMPLE_BLOCKS, BLOCK_BYTES = 16, 1 << 16
ALLOW_FLAG = "--allow-data-change"


def sampled_hash(path: Path) -> str:
    """sha256 of SAMPLE_BLOCKS blocks spread evenly over the file (all of a small file)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        last = max(0, size - BLOCK_BYTES)
        for i in range(SAMPLE_BLOCKS):
            f.seek(last * i // (SAMPLE_BLOCKS - 1))
            digest.update(f.read(BLOCK_BYTES))
    return digest.hexdigest()


def _local_path(spec: str) -> Optional[Path]:
    """The file or directory a tokenizer spec names on this machine, if it names one."""
    path = Path(spec.removeprefix("gpt2:").removeprefix("hf:")).expanduser()
    return path if path.exists() else None


def tokenizer_files(data_dir: Path, info: dict[str, Any]) -> list[Path]:
    """The local files that define a prepared directory's tokenizer (none for `bytes`, a
    tiktoken encoding or a hub name: their name is their identity)."""
    if "file" in info:
        return [data_dir / info["file"]]
    path = _local_path(info["spec"])
    if path is None:
        return []
    if path.is_file():
        return [path]
    return [path / name for name in TOKENIZER_FILES if (path / name).is_file()]


def data_fingerprint(data_dir: str | Path) -> dict[str, Any]:
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    info = meta["tokenizer"]
    files = hashlib.sha256()
    for path in tokenizer_files(data_dir, info):
        files.update(f"{path.name}:{sha256_file(path)}\n".encode())
    splits = {}
    for split in SPLITS:
        path = bin_path(data_dir, split)
        splits[split] = {"bytes": path.stat().st_size,
                         "sha256": meta["splits"].get(split, {}).get("sha256") or "",
                         "sampled": sampled_hash(path)}
    return {"tokenizer": {"spec": info["spec"], "kind": info.get("kind", ""),
                          "vocab_size": info["vocab_size"], "eot_id": info["eot_id"],
                          "files_sha256": files.hexdigest()},
            "splits": splits}


def tokenizer_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    a, b = saved.get("tokenizer", {}), now["tokenizer"]
    if (a.get("spec"), a.get("kind")) != (b["spec"], b["kind"]):
        return [f"tokenizer {b['spec']!r} ({b['kind']}), the run's is {a.get('spec')!r} "
                f"({a.get('kind')})"]
    if (a.get("vocab_size"), a.get("eot_id")) != (b["vocab_size"], b["eot_id"]):
        return [f"the tokenizer has {b['vocab_size']} tokens (end-of-text {b['eot_id']}), the "
                f"run's had {a.get('vocab_size')} (end-of-text {a.get('eot_id')})"]
    if a.get("files_sha256") != b["files_sha256"]:
        return [f"tokenizer {b['spec']!r} has other files than the run's"]
    return []


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the data a run recorded and the data now, in words (the
    record's log of allowed changes is no part of the data)."""
    found = tokenizer_differences(saved, now)
    for split, cur in now["splits"].items():
        old = saved.get("splits", {}).get(split, {})
        name = f"{split}.bin"
        if old.get("bytes") != cur["bytes"]:
            found.append(f"{name} is {cur['bytes']:,} bytes, the run was trained on "
                         f"{old.get('bytes', 0):,}")
        elif (old.get("sha256"), old.get("sampled")) != (cur["sha256"], cur["sampled"]):
            found.append(f"{name} has other content than the run's (same size, "
                         f"{cur['bytes']:,} bytes)")
    return found


def check_data(prog: str, run_dir: str, saved: dict[str, Any], data_dir: str | Path,
               allow: bool, what: str = "data") -> Optional[dict[str, Any]]:
    """Refuse (DataError: exit 2) data other than the run's, naming the difference, unless
    `allow` (--allow-data-change), which is said on stderr. `what`: "data" compares all of
    it, "tokenizer" only the tokenizer (mom-generate). Returns the data's fingerprint, or
    None for a run recorded before mom-ds kept one (said in a warning)."""
    if not saved:
        print(f"{prog}: warning: {run_dir} records no data fingerprint (trained before mom-ds "
              f"kept one): {data_dir} cannot be checked against the data it was trained on",
              file=sys.stderr)
        return None
    now = data_fingerprint(data_dir)
    found = (tokenizer_differences if what == "tokenizer" else differences)(saved, now)
    if found and not allow:
        raise DataError(f"{data_dir} is not the {what} {run_dir} was trained on: "
                        f"{'; '.join(found)}. Fix: use the run's data (mom-prep it again with "
                        f"the settings in its meta.json), or pass {ALLOW_FLAG} to use this "
                        f"anyway.")
    if found:
        print(f"{prog}: warning: {ALLOW_FLAG}: using {data_dir}, not the {what} {run_dir} was "
              f"trained on: {'; '.join(found)}", file=sys.stderr)
    return now


# --- the run's own copy of its tokenizer ----------------------------------------------------
def save_run_tokenizer(data_dir: str | Path, run_dir: str | Path) -> None:
    """Copy the data's tokenizer into RUN/tokenizer/ (its meta.json record and its local
    files), unless the copy there already is that tokenizer. Written under a private name
    and renamed into place, so a reader sees the old copy or the new one, never a part."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    info = dict(read_meta(data_dir)["tokenizer"])
    fingerprint = data_fingerprint(data_dir)["tokenizer"]
    target = run_dir / TOKENIZER_DIR
    try:
        if json.loads((target / META_FILE).read_text())["fingerprint"] == fingerprint:
            return
    except (OSError, ValueError, KeyError):
        pass
    tmp = run_dir / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = tokenizer_files(data_dir, info)
    for path in files:
        shutil.copyfile(path, tmp / path.name)
    if files and "file" not in info:  # a path spec: loaded from the copy, its prefix kept
        info["copied_as"] = "gpt2:" if info["spec"].startswith("gpt2:") else ""
        if _local_path(info["spec"]).is_file():
            info["file"] = files[0].name
    (tmp / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "tokenizer": info,
                                             "fingerprint": fingerprint}, indent=1))
    old = run_dir / f".{TOKENIZER_DIR}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def run_tokenizer_dir(path: str | Path) -> Optional[Path]:
    """RUN/tokenizer/ of a run given as its directory, its ckpt/ or one ckpt/step_* tag (as
    the tools take it), if the run has one."""
    path = Path(path)
    run_dir = path if (path / "ckpt").is_dir() else \
        path.parent.parent if path.name.startswith("step_") else path.parent
    found = run_dir / TOKENIZER_DIR / META_FILE
    return found.parent if found.is_file() else None


def load_run_tokenizer(directory: Path):
    """The tokenizer save_run_tokenizer copied into `directory`."""
    from data_prep.tokenizer import load_tokenizer

    info = json.loads((directory / META_FILE).read_text())["tokenizer"]
    if "file" in info:
        return load_tokenizer(str(directory / info["file"]))
    if "copied_as" in info:
        return load_tokenizer(info["copied_as"] + str(directory))
    return load_tokenizer(info["spec"])


def run_tokenizer(prog: str, checkpoint: str | Path, run, data_dir: Optional[str] = None,
                  allow: bool = False):
    """The tokenizer a run was trained with, for a tool given the run as `checkpoint`: its
    own copy (RUN/tokenizer/); else (an explicit `data_dir`, or a run from before the copy)
    a data directory's, refused unless it is the tokenizer the run recorded or `allow`."""
    from data_prep.tokenizer import load_data_tokenizer

    own = run_tokenizer_dir(checkpoint)
    if own is not None and not data_dir:
        return load_run_tokenizer(own)
    data_dir = data_dir or run.data.data_dir
    check_data(prog, str(checkpoint), run.data.fingerprint, data_dir, allow, what="tokenizer")
    return load_data_tokenizer(data_dir)
