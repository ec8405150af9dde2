"""Counting ids on the device without a host sync."""
from __future__ import annotations

from typing import Optional

import torch


def count_ids(ids: torch.Tensor, n: int, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n,) long counts of each id in [0, n) of the flat `ids`; with `real` (bool, the shape
    of ids) only the ids where it is True count (padding counts nowhere). scatter_add into a
    buffer of a size known in advance, not torch.bincount: on CUDA bincount reads its
    input's min and max back to the host to size its output (ATen SummaryOps.cu), a sync
    per call."""
    ids = ids.reshape(-1) if ids.dim() != 1 else ids  # a reshape is an op even when a no-op
    counts = torch.zeros(n, dtype=torch.long, device=ids.device)
    ones = torch.ones_like(ids) if real is None else real.reshape(-1).long()
    return counts.scatter_add_(0, ids, ones)
