"""The on-disk format of mom-ds checkpoints, on one process and without torch.distributed or
DeepSpeed: names, tags, the manifest and its check, which tag to read, reading a tag's
tensors whole, writing one file, pruning, and a weights-only checkpoint. mom-train's
collective save and load (train/checkpoint.py) write and read through it; mom-eval,
mom-generate, mom-convert, mom-assemble and the harness read through it alone.

Layout under `<out_dir>/ckpt/`:
  step_000100/
    dense.pt                   every dense parameter's fp32 weight and AdamW moments, whole
                               (written by rank 0), and the client state: config, step,
                               tokens seen, the data position, the LR schedule, the world
    experts_ep{e}_of_{E}.pt    the expert-parallel pools' slices held by expert-parallel rank
                               e (written by the first of its replicas), same contents, keyed
                               by the same names, with the global modules each slice holds
    run_state_rank{r}.pt       rank r's RNG states
    manifest.json              every file's size and sha256, written last: a checkpoint
                               whose files do not match it is damaged
  latest                       the tag of the newest COMPLETE checkpoint
  best.json                    the tag with the lowest validation loss and that loss: pruning
                               (train.keep_checkpoints) never deletes it, so a loss that rises
                               for several checkpoints cannot leave only bad ones

Every tensor is stored whole (a pool: whole, or as E contiguous module slices), by its
parameter name, the way DeepSpeed's universal checkpoints store them: the values come from
and go back to the engine through DeepSpeed's own accessors (train/checkpoint.py: deepspeed.utils
safe_get/set_full_fp32_param and _optimizer_state, which gather and scatter ZeRO's
partitions at every stage), so the files do not depend on how the run was partitioned. A
run resumes with another number of ranks or another expert_parallel_size; with the same
layout it continues bit for bit.

A checkpoint is written under its tag, every rank waits for every file, rank 0 writes the
manifest, then replaces `latest` with os.replace (atomic on POSIX): a process killed
mid-write leaves `latest` on the previous checkpoint, and the half-written directory is
ignored (and overwritten when that step is saved again). A resume verifies the manifest
first; a damaged newest checkpoint (or a `latest` naming nothing) falls back, with a
warning naming both, to the newest checkpoint that verifies.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import BAD_INPUT
from ..files import replaced, sha256_file, write_text
from .published import LATEST, best_tag, latest_tag, publish

DENSE = "dense.pt"
MANIFEST = "manifest.json"
# how torch.save's C++ writer reports a write that failed (full disk, file-size limit)
_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|file write failed")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message names the file and the fix."""
    exit_code = BAD_INPUT


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def experts_file(ep_rank: int, ep_size: int) -> str:
    return f"experts_ep{ep_rank:03d}_of_{ep_size:03d}.pt"


def write_manifest(tag_dir: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_text(tag_dir / MANIFEST, json.dumps(files, indent=1))


def verify_tag(tag_dir: Path, published: bool = True) -> None:
    """CheckpointError naming the file and the cause, unless every file of the tag is there
    with the size and checksum its manifest recorded. A published tag (named by `latest`)
    from before manifests must at least hold its dense file; an unpublished one without a
    manifest was never completed."""
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir} does not exist")
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        if not published or not (tag_dir / DENSE).is_file():
            raise CheckpointError(f"{tag_dir} has no {MANIFEST}: its writing never finished")
        return
    try:
        files = json.loads(manifest.read_text())
    except ValueError as err:
        raise CheckpointError(f"{manifest} is damaged ({err})") from None
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path} is {size} bytes, the manifest says {want['bytes']} "
                                  f"(truncated or overwritten)")
        if sha256_file(path) != want["sha256"]:
            raise CheckpointError(f"{path} does not match its checksum in {manifest} (damaged)")


def choose_tag(ckpt_dir: str | Path, requested: Optional[str] = None
               ) -> tuple[str, Optional[str]]:
    """(the tag to resume from, a warning when it is not the one `latest` names). With
    `requested` (--resume-from) that tag or an error; otherwise `latest`'s, or the newest
    that verifies when `latest` is missing, empty, names nothing or names a damaged tag."""
    ckpt_dir = Path(ckpt_dir)
    if requested:
        try:
            verify_tag(ckpt_dir / requested)
        except CheckpointError as err:
            tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
            raise CheckpointError(f"--resume-from {requested}: {err}. Fix: one of {tags}.") \
                from None
        return requested, None
    named = latest_tag(ckpt_dir)
    problems = []
    if named:
        try:
            verify_tag(ckpt_dir / named)
            return named, None
        except CheckpointError as err:
            problems.append(str(err))
    elif (ckpt_dir / LATEST).is_file():
        problems.append(f"{ckpt_dir / LATEST} is empty")
    else:
        problems.append(f"{ckpt_dir / LATEST} is missing")
    for tag in sorted((p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name != named),
                      reverse=True):
        try:
            verify_tag(ckpt_dir / tag, published=False)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        return tag, (f"{'; '.join(problems)}: resuming from {ckpt_dir / tag}, the newest "
                     f"complete checkpoint, instead")
    if not any(ckpt_dir.glob("step_*")) and named is None:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}. Fix: drop --resume to "
                              f"start fresh.")
    raise CheckpointError(f"--resume: no complete checkpoint in {ckpt_dir}: "
                          f"{'; '.join(problems)}. Fix: drop --resume to start fresh.")


def newest_before(ckpt_dir: str | Path, step: int) -> Optional[str]:
    """The newest complete checkpoint of a step before `step`, or None."""
    ckpt_dir = Path(ckpt_dir)
    for tag in sorted((p.name for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True):
        if tag < tag_for(step):
            try:
                verify_tag(ckpt_dir / tag, published=False)
                return tag
            except CheckpointError:
                continue
    return None


# --- write ----------------------------------------------------------------------------------
def write_file(obj: Any, path: Path) -> None:
    """torch.save under a temporary name, then renamed. A write that fails (the disk filled
    after check_space, a quota, a file-size limit) removes the partial file and is one line
    naming the file and the free space: torch reports it as a C++ `enforce fail at
    inline_container.cc` RuntimeError, or as an OSError naming no file."""
    try:
        with replaced(path) as tmp:  # a failed write leaves no partial file
            torch.save(obj, tmp)
    except (RuntimeError, OSError) as err:
        if isinstance(err, RuntimeError) and not _WRITE_FAILED.search(str(err)):
            raise  # not a failed write: a bug, keeps its traceback
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "the write failed"
        error = CheckpointError(
            f"cannot write {path} ({reason}); {size_text(shutil.disk_usage(path.parent).free)} "
            f"are free on its file system. Fix: free space or lower train.keep_checkpoints, then "
            f"--resume from the last published checkpoint ({path.parent.parent / LATEST}).")
        error.report = True  # this rank's own file: it says so, whatever its rank
        raise error from None


def write_weights(ckpt_dir: str | Path, step: int, client_state: dict[str, Any],
                  weights: dict[str, torch.Tensor]) -> str:
    """A weights-only checkpoint of one process (no optimizer state, no RNG): what tools that
    make a model without training it write (mom-assemble). Readable by read_tag and every
    tool built on it; published like a training checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if tag_dir.exists():
        shutil.rmtree(tag_dir)
    tag_dir.mkdir(parents=True)
    client = {**client_state, "adam_step": 0, "world_size": 1, "expert_parallel_size": 1}
    write_file({"client": client, "params": {n: {"weight": w} for n, w in weights.items()}},
           tag_dir / DENSE)
    write_manifest(tag_dir)
    publish(ckpt_dir, tag)
    return tag


def size_text(count: int) -> str:
    """A byte count for a message, to three significant digits (exact bytes under 10 KB),
    so that two close sizes, such as what a checkpoint needs and what is free, differ."""
    if count < 10 * 2 ** 10:
        return f"{count:,} bytes"
    unit = next(u for u, scale in (("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10))
                if count >= scale)
    value = count / 2 ** (10 * ("KB", "MB", "GB").index(unit) + 10)
    return f"{value:,.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete complete checkpoints older than the newest `keep`, never the published one
    and never the best (best.json)."""
    current = latest_tag(ckpt_dir)
    best = best_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name <= current)
    for old in tags[:-keep]:
        if best is None or old != best[0]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


# --- read -----------------------------------------------------------------------------------
def load_file(path: Path) -> Any:
    """torch.load of one checkpoint file, its damage named: tensors and plain data only
    (weights_only: no pickle runs code), memory-mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        if "weights_only" in str(err):  # torch's own advice there is the unsafe option
            wants = re.search(r"GLOBAL (\S+)", str(err))
            raise CheckpointError(
                f"{path} is not a tensors-only checkpoint: it holds pickled Python objects"
                f"{f' ({wants.group(1)})' if wants else ''} that mom-ds never writes, and it "
                f"was not loaded because unpickling them could run code. Fix: use a checkpoint "
                f"written by mom-train (--resume-from TAG) from a source you trust.") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} cannot be read ({first}): the file is damaged. Fix: "
                              f"resume from an earlier checkpoint (--resume-from TAG).") from None


def read_client(tag_dir: str | Path) -> dict[str, Any]:
    """The client state of checkpoint tag (config, step, data position, ...); its tensors
    stay on disk (memory-mapped, never touched)."""
    return load_file(Path(tag_dir) / DENSE)["client"]


def read_tag(tag_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(client state, {name: whole tensors}) of a checkpoint tag: the dense file and the
    expert slices joined along the module dimension. Memory-mapped: a caller reads only
    the tensors it touches. Refuses a tag whose files are not one complete set."""
    tag_dir = Path(tag_dir)
    dense_path = tag_dir / DENSE
    if not dense_path.is_file():
        raise CheckpointError(f"{dense_path} is missing: {tag_dir} is not a complete mom-ds "
                              f"checkpoint. Fix: resume from another tag (write its name "
                              f"into {tag_dir.parent / LATEST}) or start a new run.")
    dense = load_file(dense_path)
    client, params = dense["client"], dict(dense["params"])
    ep_size = client["expert_parallel_size"]
    found = sorted(p.name for p in tag_dir.glob("experts_*.pt"))
    if ep_size > 1 and found:
        wanted = [experts_file(e, ep_size) for e in range(ep_size)]
        if found != wanted:
            raise CheckpointError(f"{tag_dir}: the expert files {found} are not the complete "
                                  f"set {wanted[0]} .. {wanted[-1]}; the checkpoint is damaged. "
                                  f"Fix: resume from an earlier tag.")
        slices = [load_file(tag_dir / name) for name in wanted]
        for name in slices[0]["params"]:
            params[name] = {key: torch.cat([s["params"][name][key] for s in slices])
                            for key in slices[0]["params"][name]}
    return client, params
