"""The peak of memory held by tensors during a block on CPU: the counterpart of CUDA's `max_memory_allocated`.

A process's peak RSS also counts what the C allocator keeps after tensors are freed. glibc raises its mmap
threshold as large blocks are freed, so later tensors of up to 32 MB come from its heap, whose holes are
rarely handed back: a step that allocates and frees many medium tensors (activation checkpointing replays
every layer) can show twice its tensors' peak in RSS. Counting tensors alone gives the number that does not
depend on the allocator, and so compares methods on what they keep.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorPeak(TorchDispatchMode):
    """Inside ``with TensorPeak(existing) as peak:``, ``peak.peak_bytes`` is the most bytes held at once by the
    storages that operations created in the block (views share their base's storage; `existing` tensors, such
    as parameters, and their views are not counted)."""

    def __init__(self, existing: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self._existing = {t.untyped_storage().data_ptr() for t in existing}
        self._live: dict[int, int] = {}  # storage address -> bytes
        self.current_bytes = 0
        self.peak_bytes = 0

    def _freed(self, address: int) -> None:
        self.current_bytes -= self._live.pop(address, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or address in self._live or address in self._existing:
                continue
            self._live[address] = size
            self.current_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            weakref.finalize(storage, self._freed, address)
        return out
