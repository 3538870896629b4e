"""The interface the trainer reads data through: a data source and the training stream it builds.

``loader.StoreDataSource`` is the prepared store's; the tests' stand-ins implement the same methods
and take their samples by the same indexing (``plan.micro_batch_indices``) and their deep-supervision
targets by the same down-sampling (``patch_geometry.downsample_target``), so they cannot drift
from the real loader. Typed as protocols: nothing has to inherit, and a reader (or a type checker)
can follow the data from ``Trainer`` into the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ...config import StreamConfig


@runtime_checkable
class TrainStream(Protocol):
    """Yields ``(step, micro_batches)`` from the start step on, forever (see ``loader.py``'s docstring
    for a micro-batch's keys); ``state_dict()`` is what a resume needs; ``close()`` stops workers."""

    def __iter__(self) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]: ...

    def state_dict(self) -> dict: ...

    def close(self) -> None: ...


@runtime_checkable
class DataSource(Protocol):
    def train_stream(self, *, rank: int, world_size: int, start_step: int, device: torch.device) -> TrainStream:
        """This rank's stream. A stream with a ``fingerprint`` attribute (the sample plan's) has it
        checked against a resumed checkpoint's."""
        ...

    def validation_case_ids(self) -> list[str]: ...

    def validation_case_shape(self, case_id: str) -> tuple[int, ...]: ...

    def validation_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """(image float32 [C, X, Y, Z] normalised as in training, label int64 [X, Y, Z], meta)."""
        ...


#: How the trainer gets its source: called with the run's ``StreamConfig`` (``loader.StoreDataSource``
#: by default; a test passes its stand-in class).
DataSourceFactory = Callable[[StreamConfig], DataSource]
