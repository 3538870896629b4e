"""Recycled shared-memory slabs for the raw micro-batches that DataLoader workers hand over.

A worker's batch reaches the main process without a copy only if its tensors live in shared
memory. A fresh segment per batch is expensive: torch reserves every page when it creates one
(``posix_fallocate``) and each page then faults on first write. On the development VM that is
~1 ms per MB, 6 to 15 ms for one sample's raw voxels (a 128^3 int16 + uint8 crop is 6 MB,
a rotated sample's box up to 26 MB), as much as reading and decoding them. So each worker keeps
a few slabs, already mapped and faulted, and the main process hands a slab back once nothing
reads the batch any more.

Protocol (``loader.TrainStream`` is the only consumer that releases):

- The main process creates ``SlabPool(num_workers, slots)`` before the DataLoader starts. Its
  ``state`` tensor [workers, slots] lives in shared memory: 0 = free, 1 = in flight.
- A worker's ``carve`` takes a free slot of its own row, marks it in flight, and returns views
  into that slot's slab (created, or replaced by a larger one, while the slot is free) plus a
  ticket ``(worker, slot)``. Only the worker sets a flag to 1; only the main process sets it to 0.
- The main process calls ``release(ticket)`` after the batch has been augmented or copied to the
  device (``finish``), when no tensor it returned aliases the slab.
- No free slot (the consumer holds more batches than expected, or nobody releases): the worker
  falls back to fresh segments, never waits and never overwrites a batch in flight.

Outside a DataLoader worker ``carve`` returns private tensors and no ticket.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_ALIGN = 64  # bytes: every tensor of a slab starts on a cache line
_GROW = 4 << 20  # slabs grow in 4 MiB steps, so box sizes that vary a little reuse one slab


def _layout(specs: Sequence[tuple[Sequence[int], torch.dtype]]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        total += -(-nbytes // _ALIGN) * _ALIGN
    return offsets, total


def _fresh_shared(nbytes: int) -> torch.UntypedStorage:
    return torch.UntypedStorage._new_shared(max(1, nbytes))


class SlabPool:
    """Per-worker recycled shared-memory slabs (see the module docstring)."""

    def __init__(self, workers: int, slots: int):
        self.state = torch.zeros((max(1, int(workers)), max(1, int(slots))), dtype=torch.int32).share_memory_()
        self.worker: int | None = None  # benchmarks: act as this worker in the main process
        self._slabs: dict[int, torch.UntypedStorage] = {}  # this process's slabs, by slot
        self.fresh = 0  # batches this process had to put in fresh segments (no free slot)

    def __getstate__(self):
        return {"state": self.state, "worker": self.worker, "_slabs": {}, "fresh": 0}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _worker_id(self) -> int | None:
        if self.worker is not None:
            return self.worker
        info = torch.utils.data.get_worker_info()
        return None if info is None else info.id

    def carve(self, specs: Sequence[tuple[Sequence[int], torch.dtype]]
              ) -> tuple[list[torch.Tensor], tuple[int, int] | None]:
        """Empty tensors of the given (shape, dtype), views of one slab; and the slab's ticket."""
        w = self._worker_id()
        if w is None:  # main process, num_workers=0: nothing is handed over
            return [torch.empty(tuple(shape), dtype=dtype) for shape, dtype in specs], None
        offsets, total = _layout(specs)
        if w >= self.state.shape[0]:
            raise RuntimeError(f"worker {w} has no row in a SlabPool built for {self.state.shape[0]} workers")
        flags = self.state[w].tolist()
        free = [k for k, f in enumerate(flags) if f == 0]
        fitting = [k for k in free if k in self._slabs and self._slabs[k].nbytes() >= total]
        if fitting:
            k = fitting[0]
        elif free:  # grow (or create) the slab of a free slot; the old one goes when no batch uses it
            k = next((k for k in free if k not in self._slabs), free[0])
            self._slabs[k] = _fresh_shared(-(-total // _GROW) * _GROW)
        else:
            self.fresh += 1
            storage = _fresh_shared(total)
            return self._views(storage, specs, offsets), None
        self.state[w, k] = 1
        return self._views(self._slabs[k], specs, offsets), (w, k)

    @staticmethod
    def _views(storage: torch.UntypedStorage, specs, offsets) -> list[torch.Tensor]:
        out = []
        for (shape, dtype), off in zip(specs, offsets):
            t = torch.empty(0, dtype=dtype)
            size = tuple(int(s) for s in shape)
            t.set_(storage, off // t.element_size(), size)
            out.append(t)
        return out

    def release(self, ticket) -> None:
        """Hand a slab back (main process). ``ticket`` as carved, or None (nothing to do)."""
        if ticket is None:
            return
        w, k = (int(v) for v in np.asarray(ticket).reshape(-1)[:2])
        self.state[w, k] = 0
