"""Checkpoints that resume on any world size and any expert-parallel size, published
atomically.

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
and go back to the engine through DeepSpeed's own accessors (deepspeed.utils
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
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import engine_adapter as adapter
from ..errors import BAD_INPUT
from ..files import replaced, sha256_file, write_text
from ..parallel.parallelize import ParallelLayout
from ..parallel.placement import ModulePlacement
from .health import stop
from .published import LATEST, best_tag, latest_tag, publish, record_best

DENSE = "dense.pt"
MANIFEST = "manifest.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
_EXPERTS = re.compile(r"^experts_ep(\d+)_of_(\d+)\.pt$")
# how torch.save's C++ writer reports a write that failed (full disk, file-size limit)
_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|file write failed")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message names the file and the fix."""
    exit_code = BAD_INPUT


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def experts_file(ep_rank: int, ep_size: int) -> str:
    return f"experts_ep{ep_rank:03d}_of_{ep_size:03d}.pt"


def _write_manifest(tag_dir: Path) -> None:
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


def rng_state() -> dict[str, Any]:
    # numpy's key array is stored as a tensor: the file then loads with weights_only=True
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- the engine's state, whole tensors by name ----------------------------------------------
def _whole(engine, param: torch.Tensor, key: Optional[str]) -> torch.Tensor:
    """The fp32 weight (key None) or AdamW moment of one parameter, unpartitioned, on CPU.
    Collective under ZeRO (every rank calls it for the same parameters in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else \
        safe_get_full_optimizer_state(param, key)
    if value is None:  # ZeRO-0 in fp32: the torch optimizer steps the parameter itself
        state = adapter.torch_optimizer(engine).state.get(param, {})
        value = param.detach() if key is None else state.get(key, torch.zeros_like(param))
    return value.detach().float().cpu().clone()


def _prepare_optimizer_state(engine) -> None:
    """Make every AdamW moment reachable through DeepSpeed's accessors. A fresh engine has
    none yet (torch creates them at the first step), so they are created as that step
    would, at zero, and linked to their parameters again (engine_adapter)."""
    base = adapter.torch_optimizer(engine)
    for p in [*(p for group in base.param_groups for p in group["params"]),
              *adapter.zero3_groups(engine)]:
        state = base.state[p]
        if "exp_avg" not in state:
            state.update(step=torch.zeros((), dtype=torch.float32),
                         exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    adapter.relink_optimizer_states(engine)


def _adam_step(engine) -> int:
    for state in adapter.torch_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def engine_state(engine, model) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: {"weight", "exp_avg", "exp_avg_sq"}} of this rank's parameters."""
    _prepare_optimizer_state(engine)
    return {name: {"weight": _whole(engine, p, None),
                   **{key: _whole(engine, p, key) for key in MOMENTS}}
            for name, p in model.named_parameters() if p.requires_grad}


def load_engine_state(engine, model, state: dict[str, dict[str, torch.Tensor]],
                      adam_step: int) -> None:
    """Put whole tensors (already cut to this rank's modules) back into the engine: its
    fp32 masters and moments through DeepSpeed's setters, then the low-precision copies the
    forward uses from the masters."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _prepare_optimizer_state(engine)
    base = adapter.torch_optimizer(engine)
    partitioned = False
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        entry = state[name]
        if adapter.is_zero3_partitioned(p):
            partitioned = True
            for key in (None, *MOMENTS):
                adapter.set_zero3_partition(p, entry["weight" if key is None else key], key)
        elif adapter.is_zero12_mapped(p):
            partitioned = True
            device = engine.device
            safe_set_full_fp32_param(p, entry["weight"].to(device))
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, entry[key].to(device), key)
        else:  # ZeRO-0 in fp32: the optimizer's state is keyed by the parameter itself
            with torch.no_grad():
                p.copy_(entry["weight"])
                for key in MOMENTS:
                    base.state[p][key].copy_(entry[key])
    for slot in base.state.values():
        if "step" in slot:
            slot["step"] = torch.full_like(torch.as_tensor(slot["step"]), float(adam_step)) \
                if torch.is_tensor(slot["step"]) else adam_step
    if partitioned:
        adapter.refresh_low_precision(engine)


# --- save -----------------------------------------------------------------------------------
def _write(obj: Any, path: Path) -> None:
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


def save(engine, model, layout: ParallelLayout, ckpt_dir: str | Path, step: int,
         client_state: dict[str, Any], keep: int) -> str:
    """Write checkpoint `step`, then publish it. Collective: all ranks call it."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    check_space(ckpt_dir, checkpoint_bytes(model), step)
    if rank == 0:
        if tag_dir.exists():  # an unpublished earlier attempt at this step
            shutil.rmtree(tag_dir)
        tag_dir.mkdir(parents=True)
    dist.barrier()
    state = engine_state(engine, model)
    _refuse_non_finite(state, step, ckpt_dir, tag_dir)
    experts = {n for n in state if _is_sharded(n, layout)}
    client = {**client_state, "adam_step": _adam_step(engine),
              "world_size": layout.world_size, "expert_parallel_size": layout.ep_size}
    if rank == 0:
        _write({"client": client, "params": {n: v for n, v in state.items() if n not in experts}},
               tag_dir / DENSE)
    if experts and dist.get_rank(layout.expert_dp_group) == 0:
        owned = {n: _owned(n, layout, model) for n in experts}
        _write({"params": {n: state[n] for n in experts},
                "modules": {n: (s.start, s.stop) for n, s in owned.items()}},
               tag_dir / experts_file(layout.ep_rank, layout.ep_size))
    _write({"rng": rng_state()}, tag_dir / f"run_state_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk before the checkpoint is published
    if rank == 0:
        _write_manifest(tag_dir)
        publish(ckpt_dir, tag)
        record_best(ckpt_dir, tag, client_state.get("eval_loss"))
        if keep:
            _prune(ckpt_dir, keep)
    dist.barrier()
    return tag


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
    _write({"client": client, "params": {n: {"weight": w} for n, w in weights.items()}},
           tag_dir / DENSE)
    _write_manifest(tag_dir)
    publish(ckpt_dir, tag)
    return tag


def checkpoint_bytes(model) -> int:
    """About what one checkpoint takes: fp32 weight and two AdamW moments per trained
    parameter (numel before ZeRO-3 partitioning)."""
    return sum(12 * getattr(p, "ds_numel", p.numel()) for p in model.parameters()
               if p.requires_grad)


def size_text(count: int) -> str:
    """A byte count for a message, to three significant digits (exact bytes under 10 KB),
    so that two close sizes, such as what a checkpoint needs and what is free, differ."""
    if count < 10 * 2 ** 10:
        return f"{count:,} bytes"
    unit = next(u for u, scale in (("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10))
                if count >= scale)
    value = count / 2 ** (10 * ("KB", "MB", "GB").index(unit) + 10)
    return f"{value:,.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"


def check_space(ckpt_dir: Path, needed: int, step: int) -> None:
    """Refuse to start writing a checkpoint that cannot fit (a full disk mid-write is an
    unreadable error and a half-written tag). Collective: every rank checks its own file
    system and all agree."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ckpt_dir).free
    short = torch.tensor(float(free < 1.1 * needed))
    dist.all_reduce(short)
    if float(short):
        raise CheckpointError(f"no space left on {ckpt_dir} for the checkpoint of step {step}: "
                              f"it needs about {size_text(needed)} plus a 10% margin "
                              f"({size_text(int(1.1 * needed))}), "
                              f"{size_text(free)} are free on this rank. Fix: free space "
                              f"or lower train.keep_checkpoints, then --resume from the last "
                              f"published checkpoint.")


def _refuse_non_finite(state: dict[str, dict[str, torch.Tensor]], step: int, ckpt_dir: Path,
                       tag_dir: Path) -> None:
    """A checkpoint of non-finite weights is never written, so it can neither be published
    nor prune a good one. Collective: every rank judges the tensors it holds."""
    bad = [name for name, entry in state.items() if not torch.isfinite(entry["weight"]).all()]
    flag = torch.tensor(float(len(bad)))
    dist.all_reduce(flag)
    if float(flag):
        if dist.get_rank() == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        where = f" (first: {bad[0]})" if bad else " on another rank"
        raise stop(f"{int(float(flag))} weight tensor(s) are not finite{where}", step, ckpt_dir)


def _is_sharded(name: str, layout: ParallelLayout) -> bool:
    return any(f".{pool}." in f".{name}" for pool in layout.sharded)


def _pool_size(name: str, config) -> int:
    return config.n_attn_modules if ".attn_pool." in name else config.n_ffn_modules


def _owned(name: str, layout: ParallelLayout, model) -> slice:
    return ModulePlacement(_pool_size(name, model.config), layout.ep_size, layout.ep_rank).owned()


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete complete checkpoints older than the newest `keep`, never the published one
    and never the best (best.json)."""
    current = latest_tag(ckpt_dir)
    best = best_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name <= current)
    for old in tags[:-keep]:
        if best is None or old != best[0]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


# --- read -----------------------------------------------------------------------------------
def _load(path: Path) -> Any:
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
    return _load(Path(tag_dir) / DENSE)["client"]


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
    dense = _load(dense_path)
    client, params = dense["client"], dict(dense["params"])
    ep_size = client["expert_parallel_size"]
    found = sorted(p.name for p in tag_dir.glob("experts_*.pt"))
    if ep_size > 1 and found:
        wanted = [experts_file(e, ep_size) for e in range(ep_size)]
        if found != wanted:
            raise CheckpointError(f"{tag_dir}: the expert files {found} are not the complete "
                                  f"set {wanted[0]} .. {wanted[-1]}; the checkpoint is damaged. "
                                  f"Fix: resume from an earlier tag.")
        slices = [_load(tag_dir / name) for name in wanted]
        for name in slices[0]["params"]:
            params[name] = {key: torch.cat([s["params"][name][key] for s in slices])
                            for key in slices[0]["params"][name]}
    return client, params


def load(engine, model, layout: ParallelLayout, ckpt_dir: str | Path, tag: str
         ) -> dict[str, Any]:
    """Resume from checkpoint `tag` (choose_tag), whatever world size and expert-parallel
    size wrote it: weights, AdamW state and schedule into the engine, RNG restored (or,
    on another world size, re-derived). Returns the client state. Every rank checks the
    checkpoint before any rank enters a collective of the load."""
    ckpt_dir = Path(ckpt_dir)
    problem, client, params = "", {}, {}
    try:
        client, params = read_tag(ckpt_dir / tag)
        local = _cut_to_this_rank(params, model, layout)
        same_layout = client["world_size"] == layout.world_size
        rank_file = ckpt_dir / tag / f"run_state_rank{dist.get_rank()}.pt"
        rng = _load(rank_file)["rng"] if same_layout and rank_file.is_file() \
            else None
    except (CheckpointError, KeyError, ValueError) as err:
        problem = str(err)
    failed = torch.tensor(float(bool(problem)))
    dist.all_reduce(failed)
    if problem or float(failed):
        raise CheckpointError(problem or "another rank could not read the checkpoint (its "
                              "message names the cause)")
    load_engine_state(engine, model, local, client["adam_step"])
    _set_schedule_step(engine.lr_scheduler, int(client["step"]))
    if rng is not None:
        set_rng_state(rng)
    else:  # another world size: each rank's stream is re-derived from the seed and step
        seed = int(client["config"]["train"]["seed"])
        torch.manual_seed(hash((seed, dist.get_rank(), int(client["step"]))) % 2 ** 63)
    return client


def _set_schedule_step(scheduler, step: int) -> None:
    """The LambdaLR the engine steps is a pure function of the step (loop.lr_factor); its
    state is that step, whatever parameter groups this layout has."""
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    # through its public state dict: what get_last_lr() returns has no setter
    state = scheduler.state_dict()
    state.update(last_epoch=step, _last_lr=rates)
    scheduler.load_state_dict(state)


def _cut_to_this_rank(params: dict[str, dict[str, torch.Tensor]], model,
                      layout: ParallelLayout) -> dict[str, dict[str, torch.Tensor]]:
    """The whole tensors cut to the modules this rank holds, each checked against the
    model, so a checkpoint of another model is named before any collective."""
    local = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name not in params:
            raise CheckpointError(f"the checkpoint has no parameter {name}: it was written "
                                  f"for another model. Fix: resume with the run's own config "
                                  f"(config.yaml in the run directory).")
        entry = params[name]
        if _is_sharded(name, layout):
            cut = _owned(name, layout, model)
            entry = {k: v[cut] for k, v in entry.items()}
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(entry["weight"].shape) != shape:
            raise CheckpointError(f"the checkpoint's {name} has shape "
                                  f"{tuple(entry['weight'].shape)}, this model's {shape}: it "
                                  f"was written for another model. Fix: resume with the run's "
                                  f"own config (config.yaml in the run directory).")
        local[name] = entry
    return local
