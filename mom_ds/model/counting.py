"""Counting ids on the device without a host sync."""
from __future__ import annotations

import torch


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) long counts of each id in [0, n) of the flat `ids`. scatter_add into a buffer of
    a size known in advance, not torch.bincount: on CUDA bincount reads its input's min and
    max back to the host to size its output (ATen SummaryOps.cu), a sync per call."""
    ids = ids.reshape(-1)
    counts = torch.zeros(n, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids))
