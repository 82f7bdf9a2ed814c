"""Peak memory of the tensors a block of code creates, measured exactly on any device (the CPU included, where
torch keeps no allocator statistics): every storage an operator returns is counted from its creation until it is
freed. Used by the memory tests and benchmarks; tensors that existed before the block (weights, inputs) are not
counted, nor is memory outside tensors."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """`with TensorMemory() as memory: ...` then `memory.peak` (bytes): the most bytes of storages created inside
    the block alive at once, the autograd engine's backward included."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views, in-place and out= operators return storages of their inputs: only new storages count.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _real(t)}
        for tensor in tree_leaves(out):
            if _real(tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if not size or key in self._tracked:
            return
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size


def _real(value) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_meta
