"""The module pools' checkpoint files: `module_pools_ep{e}_of_{E}.pt` in a checkpoint tag,
one per expert-parallel rank, holding that rank's modules' fp32 weights and AdamW state
keyed by GLOBAL module name (chunks.<b>.ffn_modules.<i>...). Global names are what make a
checkpoint saved with one expert-parallel size load with any other.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

PREFIX = "module_pools_"
_NAME = re.compile(rf"^{PREFIX}ep(\d+)_of_(\d+)\.pt$")


def file_name(ep_rank: int, ep_size: int) -> str:
    return f"{PREFIX}ep{ep_rank:03d}_of_{ep_size:03d}.pt"


def write(tag_dir: Path, ep_rank: int, ep_size: int, weights: dict[str, torch.Tensor],
          optimizer: dict[str, dict[str, Any]]) -> None:
    """Atomically (temporary name + rename). Files of another expert-parallel size left in
    the directory by an earlier, unpublished save of this tag are removed first (rank 0 of
    the group does it; they never share a name with this save's files)."""
    tag_dir = Path(tag_dir)
    if ep_rank == 0:
        for stale in tag_dir.glob(f"{PREFIX}*.pt"):
            match = _NAME.match(stale.name)
            if not match or int(match.group(2)) != ep_size:
                stale.unlink()
    path = tag_dir / file_name(ep_rank, ep_size)
    tmp = path.with_suffix(".tmp")
    torch.save({"ep_size": ep_size, "weights": weights, "optimizer": optimizer}, tmp)
    tmp.replace(path)


def read(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(weights, AdamW states) of the whole pools, by global name. The files are
    memory-mapped: a caller reads only the tensors it touches. Refuses a directory without
    exactly one complete set of files."""
    tag_dir = Path(tag_dir)
    found = sorted(p.name for p in tag_dir.glob(f"{PREFIX}*.pt"))
    sizes = {int(m.group(2)) for m in map(_NAME.match, found) if m}
    if not found:
        raise FileNotFoundError(
            f"{tag_dir} has no {PREFIX}*.pt: it was written by an older mom-ds that kept the "
            f"module pools in DeepSpeed's files. Fix: `mom-convert fp32 {tag_dir} model.pt` "
            f"and start a new run with --train.init_from model.pt.")
    if len(sizes) != 1 or found != [file_name(e, next(iter(sizes)))
                                    for e in range(next(iter(sizes)))]:
        raise FileNotFoundError(f"{tag_dir}: the module-pool files {found} are not one "
                                f"complete set {PREFIX}ep<e>_of_<E>.pt, e = 0 .. E-1; the "
                                f"checkpoint is damaged. Fix: resume from an earlier tag.")
    weights: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, Any]] = {}
    for name in found:
        saved = torch.load(tag_dir / name, map_location="cpu", weights_only=True, mmap=True)
        weights.update(saved["weights"])
        states.update(saved["optimizer"])
    return weights, states


def read_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The pools' weights of a checkpoint tag; {} for a model without routed blocks."""
    if not any(Path(tag_dir).glob(f"{PREFIX}*.pt")):
        return {}
    return read(tag_dir)[0]
