"""Peak tensor memory of a call, counted exactly at the ATen level.

:class:`TensorMemory` is a ``TorchDispatchMode`` that sees every ATen operator's outputs. A new
storage (one that is not a view of, or written in place into, an input) is counted from its
allocation until it is freed (a ``weakref.finalize`` on the storage), so the peak is the largest
total size of tensors allocated during the call and alive at once. Weights, inputs and anything
that existed before are not counted; allocator overhead and kernels' private scratch buffers are
not seen. This works the same on CPU and GPU and does not depend on the allocator or on RSS.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

logger = logging.getLogger(__name__)


class TensorMemory(TorchDispatchMode):
    """Track live bytes of tensors allocated inside the ``with`` block.

    Attributes:
        current: bytes allocated in the block and still alive.
        peak: the largest ``current`` seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, ptr: int) -> None:
        self.current -= self._live.pop(ptr, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in inputs or ptr in self._live:
                continue
            self._live[ptr] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, ptr)
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs (its result is dropped before return)."""
    tracker = TensorMemory()
    with torch.inference_mode(), tracker:
        result = fn()
    del result
    return tracker.peak
