"""What a checkpoint directory publishes beside its tags: `latest`, the tag of the newest
complete checkpoint, and `best.json`, the tag with the lowest validation loss. Plain files,
no torch: format.py and train/checkpoint.py write them, and whatever names the last good
checkpoint (the divergence and spike messages, a lost rank) reads them."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..files import write_text

LATEST = "latest"
BEST = "best.json"


def latest_tag(ckpt_dir: str | Path) -> Optional[str]:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def best_tag(ckpt_dir: str | Path) -> Optional[tuple[str, float]]:
    """(tag, val loss) of the best checkpoint still on disk, or None."""
    path = Path(ckpt_dir) / BEST
    try:
        best = json.loads(path.read_text())
        tag, loss = str(best["tag"]), float(best["eval_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (tag, loss) if (Path(ckpt_dir) / tag).is_dir() else None


def publish(ckpt_dir: Path, tag: str) -> None:
    """`latest` names `tag`, on disk before it is renamed into place (it publishes the
    checkpoint: after a crash it must name a complete one)."""
    write_text(ckpt_dir / LATEST, tag, durable=True)


def record_best(ckpt_dir: Path, tag: str, eval_loss: Optional[float]) -> None:
    """best.json names `tag` when its val loss is the lowest so far (a finite one)."""
    if eval_loss is None or not math.isfinite(eval_loss):
        return
    best = best_tag(ckpt_dir)
    if best is None or eval_loss <= best[1] or best[0] == tag:
        write_text(ckpt_dir / BEST, json.dumps({"tag": tag, "eval_loss": eval_loss}),
                   durable=True)


def last_good_checkpoint(ckpt_dir: Path) -> str:
    """A clause naming the published checkpoint and, when another, the best one."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return "no checkpoint was published before it"
    text = f"the last good checkpoint is {ckpt_dir / tag} (published in {ckpt_dir / LATEST})"
    best = best_tag(ckpt_dir)
    if best and best[0] != tag:
        text += f"; the best, val loss {best[1]:.4f}, is {ckpt_dir / best[0]}"
    return text
