"""A guard against device-to-host syncs that works on the CPU: it sees what a CUDA run would
stall on, although every tensor here lives on the host.

Two kinds of read stall a GPU:
- aten ops whose CUDA kernels copy device data to the host before they can run or size
  their output. They are listed in SYNCING_OPS, from PyTorch's CUDA sources (the kernels
  that call `.item()`, `cudaMemcpy` device-to-host or `at::cuda::memcpy_and_sync`) and from
  what `torch.cuda.set_sync_debug_mode("error")` reports (pytorch#91373 and its follow-ups).
  A TorchDispatchMode sees every aten op a forward and backward run, whatever Python
  called it, so an op inside torch (bincount in a loss, nonzero behind a boolean index)
  cannot hide.
- Python-level reads that become a device-to-host copy on CUDA but no aten op on the CPU
  (`Tensor.tolist`, `.numpy()`, `.cpu()` of a tensor already on the host returns it
  without dispatching): patched on the Tensor class, as the dispatch mode cannot see them.

mom-ds's own custom operators (mom_ds::grouped_mm, ...) reach the mode as one op each; the
guard runs their implementations under itself, so what they call is checked as well.

What `.cpu()` returns is on the host on CUDA too: the guard marks it, and everything
computed from marked tensors only, and reading those is no sync (a logging step's numbers,
read once with `.cpu()`, then printed: mom_ds/train/step_log.py).

`count_syncs()` counts both; `no_syncs()` fails at the first one, naming it.
"""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from typing import Iterator, Optional

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from mom_ds.model import pools

aten = torch.ops.aten

# aten overload packets whose CUDA implementation reads device data on the host.
SYNCING_OPS = {
    aten._local_scalar_dense: "the value of a tensor on the host (item, bool, int, float)",
    aten.is_nonzero: "the truth value of a one-element tensor",
    aten.equal: "a Python bool comparing two tensors",
    aten.bincount: "reads its input's min and max to size the output (SummaryOps.cu)",
    aten.histc: "reads min and max when they are not given (SummaryOps.cu)",
    aten.nonzero: "the count of nonzeros sizes the output",
    aten.argwhere: "nonzero",
    aten.masked_select: "the count of selected elements sizes the output",
    aten.multinomial: "checks the probabilities on the host",
    aten._unique: "the count of unique values sizes the output",
    aten._unique2: "the count of unique values sizes the output",
    aten.unique_dim: "the count of unique values sizes the output",
    aten.unique_consecutive: "the count of unique values sizes the output",
    aten.unique_dim_consecutive: "the count of unique values sizes the output",
}
# Ops that sync only with some arguments (repeat_interleave: below).
BOOLEAN_INDEXED = {aten.index: "indexing with a boolean mask (a nonzero)",
                   aten.index_put: "index_put with a boolean mask (a nonzero)",
                   aten.index_put_: "index_put with a boolean mask (a nonzero)",
                   aten._index_put_impl_: "index_put with a boolean mask (a nonzero)"}
PYTHON_READS = ("tolist", "numpy", "cpu")


def call_site() -> str:
    """'package/file.py:line function' of the innermost frame in mom_ds, DeepSpeed or a
    test: the code that asked for the read (torch's own frames are skipped)."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = frame.filename.replace("\\", "/")
        if path.endswith("sync_guard.py"):
            continue
        for root in ("mom_ds/", "deepspeed/", "tests/"):
            if root in path and "/torch/" not in path:
                return f"{root}{path.rsplit(root, 1)[1]}:{frame.lineno} {frame.name}"
    return "?"


def _boolean_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices or ())


def why_it_syncs(func, args: tuple, kwargs: dict) -> Optional[str]:
    """Why `func(*args, **kwargs)` would read device data on the host on CUDA, or None."""
    packet = func.overloadpacket
    if packet in SYNCING_OPS:
        return SYNCING_OPS[packet]
    # the other overloads decompose into this one before the mode sees them
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size sums the repeats on the host"
    if packet in BOOLEAN_INDEXED and _boolean_index(args):
        return BOOLEAN_INDEXED[packet]
    return None


HOST = "_sync_guard_on_host"


def on_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, HOST, False)


def _mark(t) -> None:
    if isinstance(t, torch.Tensor):
        setattr(t, HOST, True)


class _SyncCounter(TorchDispatchMode):
    def __init__(self, strict: bool):
        super().__init__()
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.sites: Counter[tuple[str, str]] = Counter()  # (read, code that made it)

    def record(self, name: str, why: str) -> None:
        if self.strict:
            raise AssertionError(f"host sync: {name} ({why}) at {call_site()}")
        self.counts[name] += 1
        self.sites[(name, call_site())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mom_ds":  # our custom operators: look inside them too
            with self:
                return pools.IMPLEMENTATIONS[func._schema.name](*args, **kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host = bool(tensors) and all(on_host(t) for t in tensors)
        why = why_it_syncs(func, args, kwargs)
        if why is not None and not host:
            self.record(str(func.overloadpacket).replace("aten.", "aten::"), why)
        out = func(*args, **kwargs)
        if host:  # computed on the host from host data: stays there
            pytree.tree_map(_mark, out)
        return out


@contextlib.contextmanager
def _guard(strict: bool) -> Iterator[Counter]:
    mode = _SyncCounter(strict)
    saved = {name: getattr(torch.Tensor, name) for name in PYTHON_READS}

    def patched(name):
        original = saved[name]

        def read(self, *args, **kwargs):
            if not on_host(self):
                mode.record(f"Tensor.{name}", "a device-to-host copy on CUDA")
            out = original(self, *args, **kwargs)
            if name == "cpu":
                # on a CPU machine .cpu() returns the tensor itself: mark a new alias, not
                # the device-side tensor the caller keeps
                out = out.detach() if out is self else out
                _mark(out)
            return out
        return read
    try:
        for name in PYTHON_READS:
            setattr(torch.Tensor, name, patched(name))
        with mode:
            yield mode
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def no_syncs():
    """Fail with AssertionError('host sync: OP (why)') at the first read."""
    return _guard(strict=True)


def count_syncs():
    """Yield the counter: `.counts` of the reads by name ('aten::bincount', 'Tensor.tolist'),
    `.sites` by (name, call site)."""
    return _guard(strict=False)
