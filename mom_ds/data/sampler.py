"""WindowSampler: seeded, epoch-based, rank-sharded, resumable order over window indices."""
from __future__ import annotations

import numpy as np

from data_prep.format import DataError


class WindowSampler:
    """Yields this rank's window indices forever, one epoch (a seeded permutation) after another.

    Unlike nanoGPT's random offsets with replacement (which replay the same batches after a
    resume, nanoGPT #467), every window is seen once per epoch, and the whole position is
    (epoch, cursor): a sampler restored from `state_dict()` continues exactly where the
    saved one stopped. Each epoch's permutation is derived from (seed, epoch) alone, so it
    does not depend on how far any earlier epoch was consumed.
    Rank r takes perm[r::world_size] of the first world_size * (n_windows // world_size)
    entries: all ranks get the same count (collectives stay in step), the union over ranks
    is each kept window once, and at most world_size - 1 windows per epoch are left out.
    """

    def __init__(self, n_windows: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if n_windows < world_size:
            raise DataError(f"{n_windows} windows cannot be shared by {world_size} ranks; "
                            f"use more data or a shorter seq_len")
        self.n_windows = n_windows
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = n_windows // world_size
        self.epoch = 0
        self.cursor = 0
        self._order_epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`, in the order they are yielded."""
        if self._order_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order = perm[: self.per_rank * self.world_size][self.rank :: self.world_size]
            self._order_epoch = epoch
        return self._order

    def __len__(self) -> int:
        """Windows per epoch on this rank."""
        return self.per_rank

    def __iter__(self) -> "WindowSampler":
        return self

    def __next__(self) -> int:
        if self.cursor == self.per_rank:
            self.epoch += 1
            self.cursor = 0
        index = int(self.epoch_order(self.epoch)[self.cursor])
        self.cursor += 1
        return index

    def state_dict(self) -> dict:
        """The position of all ranks together: every rank has taken `cursor` windows of
        epoch `epoch`, the first cursor * world_size of its permutation."""
        return {"epoch": self.epoch, "cursor": self.cursor, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved with any number of ranks: the windows taken so
        far are a prefix of the epoch's permutation, which this rank's share continues."""
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        saved_world = int(state.get("world_size", self.world_size))
        if saved_world != self.world_size:
            consumed = cursor * saved_world
            if consumed % self.world_size:
                raise DataError(f"the checkpoint's data position ({consumed} windows of epoch "
                                f"{epoch}, taken by {saved_world} ranks) is not a multiple of "
                                f"{self.world_size} ranks; keep the global batch (micro_batch_size "
                                f"x grad_accum_steps x ranks) the run had")
            cursor = consumed // self.world_size
        if epoch < 0 or not 0 <= cursor <= self.per_rank:
            raise DataError(f"sampler state {state} does not fit {self.per_rank} windows per rank per epoch; "
                            f"was the checkpoint made with a different dataset, seq_len or world size?")
        self.epoch, self.cursor = epoch, cursor
