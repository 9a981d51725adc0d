"""Peak bytes of live tensors on the CPU: what ``torch.cuda.max_memory_allocated`` is on a GPU.

Why: the cost model predicts the tensors a training step keeps alive (parameters, gradients,
optimizer state, saved activations, gradient buckets). A process's resident set also holds
what the libraries and the allocator keep for themselves, and on a CPU that is large next to
small models: with MKL (x86 PyTorch wheels) the BLAS keeps its GEMM packing buffers after
each call, 5-70 MiB per process depending on the matmul shapes and thread count (measured on
the 2-core dev VM; ``MKL_DISABLE_FAST_MM=1`` makes it 0), and glibc keeps freed chunks. GPUs
report tensors and allocator reserve apart (``max_memory_allocated`` / ``max_memory_reserved``);
on a CPU, torch keeps no such statistics, so :class:`LiveTensorBytes` counts them itself.

How: a ``TorchDispatchMode`` sees every op of the forward, backward and optimizer step
(modes travel with the autograd engine's thread-local state). Each output's storage that
did not exist when the probe started is counted once, with a ``weakref.finalize`` that takes
it off when the storage is freed (storages keep one Python object for their lifetime, so the
finalizer fires when the memory goes). For a DTensor the local shard's storage is counted.
The peak is read after every op, so a buffer an op creates and frees inside itself (a
collective's scratch space under a DTensor redistribute) is not seen.
"""
from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as probe: train_step()`` -> ``probe.peak_bytes``: the most bytes
    of CPU tensor storage created inside the block and alive at once. Storages that existed
    before (the model's parameters, the batch) are not counted: add the local parameter
    bytes to compare with a predicted per-device peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._counted: dict[int, int] = {}
        self._before: dict[int, Any] = {}

    def __enter__(self) -> "LiveTensorBytes":
        gc.collect()
        # storages alive now are not the step's; held for the probe's life so their ids stay theirs
        for o in gc.get_objects():
            if issubclass(type(o), torch.Tensor):  # not isinstance: it reads __class__ of proxies
                st = self._storage(o)
                if st is not None:
                    self._before[id(st)] = st
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._before.clear()

    @staticmethod
    def _storage(t: torch.Tensor):
        t = getattr(t, "_local_tensor", t)
        if t.device.type != "cpu" or type(t).__name__ == "FakeTensor":
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
            return None

    def _freed(self, key: int) -> None:
        self.live_bytes -= self._counted.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = self._storage(t)
            if st is None:
                continue
            key = id(st)
            if key in self._counted or key in self._before:
                continue
            n = st.nbytes()
            self._counted[key] = n
            weakref.finalize(st, self._freed, key)
            self.live_bytes += n
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        return out
