"""Activation checkpointing (train.activation_checkpointing): a segment of the forward
keeps only its inputs, and the backward runs it again to get its activations back.

torch.utils.checkpoint, non-reentrant, with the RNG state restored for the second run, so
dropout draws the same masks and every router, being a function of its input, picks the
same modules. The second run must not count twice what the first one counted (the
expert-parallel byte counters): they ask `recomputing()`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("none", "layer", "block")
_recomputing = False  # a module flag, not thread-local: CUDA runs the backward on its own thread


def recomputing() -> bool:
    """True while a checkpointed segment runs again inside the backward."""
    return _recomputing


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), its activations recomputed in the backward instead of kept."""
    if torch.compiler.is_compiling():
        # Only an E = 1 model is compiled whole, where nothing asks recomputing(); the
        # counter below is a side effect that would break the graph.
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    runs = 0

    def run(*inner: Any) -> Any:
        global _recomputing
        nonlocal runs
        runs += 1
        if runs == 1:
            return fn(*inner)
        previous, _recomputing = _recomputing, True
        try:
            return fn(*inner)
        finally:
            _recomputing = previous

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
