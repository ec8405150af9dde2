"""Micro-batches for one rank: windows from `mom_ds.data` in the resumable sampler's order,
split into inputs and next-token targets (nanoGPT's X / Y)."""
from __future__ import annotations

import numpy as np
import torch


class Batches:
    """`next()` -> (x, y), each (micro_batch_size, seq_len) int64 on `device`."""

    def __init__(self, dataset, sampler, micro_batch_size: int, device: torch.device):
        self.dataset = dataset
        self.sampler = sampler
        self.order = iter(sampler)
        self.micro_batch_size = micro_batch_size
        self.device = device

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.dataset[next(self.order)] for _ in range(self.micro_batch_size)])
        batch = torch.from_numpy(rows.astype(np.int64)).to(self.device)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.order = iter(self.sampler)
