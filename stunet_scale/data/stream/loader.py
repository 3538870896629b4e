"""The prepared store as the trainer's data source, whatever the reader (Zarr random access or WebDataset tars).

    source = StoreDataSource(StreamConfig.of(train_cfg))        # what Trainer builds by default
    with source.train_stream(rank=r, world_size=w, start_step=s, device=dev) as stream:
        for step, micro_batches in stream:      # never ends on its own
            ...                                 # len(micro_batches) == grad_accumulation
        ckpt["data"] = stream.state_dict()      # {"seed", "step"}: all a Zarr resume needs
    source.validation_case_ids(); source.validation_case(case_id)

Each micro-batch is ``{"image": float32 [m, C, *patch], "targets": [int64 [m, 1, *patch / s] per
deep-supervision output, full resolution first], "sample_index": int64 [m]}`` on ``device``, plus
``"annotated"``: bool [m, num_classes] on the host (the loss picks the channels to merge from it
without reading anything back from the device). Targets may hold the ignore label (value
``num_classes``: voxels of a source class the class map lacks); ``annotated[b, k]`` is False where
class k is unannotated in sample b's case (its mask file was missing). The loss skips the first
and marginalises the second (``train/loss.py``).

Where the work happens: DataLoader workers (``data.num_workers`` per rank, persistent, pinned
memory, ``data.prefetch_factor`` micro-batches each) read raw int16/uint8 patches plus the
parameters the sample plan drew for them. With ``augmentation.device`` gpu (auto with a GPU) the
rank's main process moves them to the device (non-blocking from pinned memory) and runs
``augment_batch`` there; with cpu (auto without a GPU) the workers run the same function and
ship finished tensors. Same parameters, same code: the two paths agree up to float rounding.
Raw batches travel in shared-memory slabs each worker recycles (``shared_slabs.py``): this
process releases a slab as soon as its batch is augmented, so tensors handed to the trainer
never alias one.

Determinism (Zarr): micro-batch ``j`` of rank ``r`` is a pure function of (seed, r, world size, j),
so a resume from ``{"seed", "step"}`` continues the exact sequence, and any ``num_workers`` gives
the same tensors. WebDataset streams are deterministic per (seed, epoch, world size, workers) and
resume from ``{"seed", "step"}`` exactly, mid-epoch included, as long as world size and
``num_workers`` are unchanged (otherwise the case order changes from the resumed epoch on); see
``webdataset_reader.py``.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ...config import ConfigError, StreamConfig, micro_batches_per_rank
from ...faults import Faults
from ..store import STORE_CHANNELS, PreparedStore, open_store
from .plan import SamplePlan
from .readers import (
    CaseHandle,
    ZarrPatchReader,
    normalization,
    plan_cases,
)
from .shared_slabs import SlabPool
from .transforms import Geometry, finish, normalize_into
from .webdataset_reader import WdsMicroBatches, load_wds_case


def open_training_store(cfg: StreamConfig) -> PreparedStore:
    """``data.root`` opened for reading. The checks of the store against the config run once, in
    the trainer's pre-flight (``stunet_scale/train/preflight.py``), not at every stream build."""
    root = Path(cfg.data.root)
    if not (root / "manifest.json").is_file():
        what = "does not exist" if not root.exists() else "has no manifest.json (not a finished prepared dataset)"
        raise ConfigError(f"data.root={cfg.data.root!r} {what}. Prepare one with `stunet-scale prepare SOURCE {cfg.data.root}`")
    return open_store(root)


def _augment_on_device(cfg: StreamConfig, device: torch.device) -> bool:
    mode = cfg.augmentation.device
    if mode == "gpu":
        return True
    if mode == "cpu":
        return False
    return device.type == "cuda"


# --------------------------------------------------------------------------------------------
# Datasets behind the DataLoader
# --------------------------------------------------------------------------------------------


def build_plan(cfg: StreamConfig, store: PreparedStore, geometry: Geometry) -> SamplePlan:
    d = cfg.data
    cases = plan_cases(store, d.train_splits)
    if not cases:
        have = sorted(store.manifest.get("stats", {}).get("splits", {}))
        raise ConfigError(f"data.train_splits={d.train_splits} selects no case of {d.root} (its splits: {have})")
    try:
        return SamplePlan(cases, seed=cfg.seed, global_batch=cfg.global_batch, patch=geometry.patch,
                          initial=geometry.initial, oversample_foreground=d.oversample_foreground,
                          aug_cfg=cfg.augmentation, channels=STORE_CHANNELS, case_weighting=d.case_weighting,
                          train_splits=d.train_splits, split_weights=d.split_weights)
    except ValueError as e:
        raise ConfigError(f"data.case_weighting: {e}") from None


class ZarrMicroBatches(torch.utils.data.Dataset):
    """Map-style: item ``j`` = the ``j``-th micro-batch of this rank (step j // accum, micro j % accum)."""

    def __init__(self, reader: ZarrPatchReader, plan: SamplePlan, geometry: Geometry, *, rank: int, world_size: int,
                 micro_batch: int, accumulation: int, augment_in_worker: bool):
        self.reader, self.plan, self.geometry = reader, plan, geometry
        self.rank, self.world_size = rank, world_size
        self.micro_batch, self.accumulation = micro_batch, accumulation
        self.augment_in_worker = augment_in_worker
        self.pool = None  # a SlabPool when raw batches go to the main process (TrainStream sets it)
        self.faults = Faults.from_env(rank)  # reliability tests: a slow or hung data pipeline on one rank

    def indices(self, j: int) -> list[int]:
        step, micro = divmod(int(j), self.accumulation)
        return self.plan.micro_batch_indices(step, self.rank, self.world_size, micro, self.micro_batch)

    def __getitem__(self, j: int) -> dict:
        if self.faults.active:
            self.faults.in_data_pipeline(int(j) // self.accumulation)
        if not self.augment_in_worker:  # voxels born in (recycled) shared memory
            return self.reader.read_micro_batch(self.indices(j), shared=self.pool)
        raw = self.reader.read_micro_batch(self.indices(j), shared=False)  # never leaves this process
        return finish(raw, self.geometry, torch.device("cpu"), in_worker=True)


class _CountFrom(torch.utils.data.Sampler):
    """An endless sampler: start, start + 1, ... (the DataLoader hands items to workers in order)."""

    def __init__(self, start: int):
        self.start = int(start)

    def __iter__(self):
        return itertools.count(self.start)


def worker_init(_worker_id: int, stopping=None, parent_pid: int | None = None) -> None:
    """One core per worker; signals sent to the whole process group are the main process's business.

    Slurm (``scancel``, preemption, ``--signal=USR1@T`` without ``B:``), torchrun and ``kill -- -PGID``
    signal every process of the job, DataLoader workers included. torch's worker handler dies on a
    SIGTERM that does not come from its parent, so the main process's next batch raised "DataLoader
    worker ... is killed by signal: Terminated" instead of saving a checkpoint (row 12 of the README's
    Reliability checks). Here a worker ignores SIGUSR1/SIGUSR2 and ignores SIGTERM while its main process is alive and
    has not begun stopping the workers (``stopping``, set by TrainStream.close() and at exit); then it
    exits quietly, as torch's handler does for its parent's SIGTERM.
    """
    torch.set_num_threads(1)
    try:
        from numcodecs import blosc

        blosc.use_threads = False
    except Exception:  # pragma: no cover - numcodecs is a dependency
        pass
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):  # pragma: no cover
            pass
    if stopping is None or parent_pid is None:
        return

    def on_sigterm(signum, frame):  # no I/O: the main process reports what happened
        if stopping.value or os.getppid() != parent_pid:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


def _worker_stop_flag():
    """A lock-free shared byte the workers read in their SIGTERM handler; set when stopping them."""
    flag = multiprocessing.RawValue("b", 0)
    atexit.register(_set_flag, flag)  # runs before multiprocessing's own exit hook terminates workers
    return flag


def _set_flag(flag) -> None:
    flag.value = 1


def as_is(item):
    """The DataLoader's per-item conversion: none. Its default turns every numpy array into a
    tensor, and a worker then gives each of those its own shared-memory segment and file
    descriptor; the raw batches' small numpy fields travel pickled by value instead."""
    return item


def make_loader(dataset, cfg: StreamConfig, sampler=None, device: torch.device | None = None, stopping=None):
    """``stopping``: the flag of _worker_stop_flag() (workers then ignore a process-group SIGTERM)."""
    d = cfg.data
    kwargs = {}
    if d.num_workers > 0:
        init = functools.partial(worker_init, stopping=stopping, parent_pid=os.getpid()) if stopping is not None else worker_init
        kwargs = {"prefetch_factor": d.prefetch_factor, "persistent_workers": True, "worker_init_fn": init}
    pin = bool(d.pin_memory) and torch.cuda.is_available() and (device is None or device.type == "cuda")
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=d.num_workers,
                                       pin_memory=pin, collate_fn=as_is, **kwargs)


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


class TrainStream:
    """Yields ``(step, micro_batches)`` forever from ``start_step``; close() stops the workers."""

    def __init__(self, cfg: StreamConfig, *, rank: int, world_size: int, start_step: int, device: torch.device,
                 batched_spatial: bool | None = None, store: PreparedStore | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.seed = int(cfg.seed)
        self.start_step = int(start_step)
        self._next_step = self.start_step
        self.accumulation = micro_batches_per_rank(cfg.global_batch, cfg.micro_batch, world_size)
        self.micro_batch = cfg.micro_batch
        self.geometry = Geometry(cfg)
        self.geometry.batched_spatial = batched_spatial
        self.on_device = _augment_on_device(cfg, self.device)
        self.format = cfg.data.format
        self.store = store if store is not None else open_training_store(cfg)
        self.plan = build_plan(cfg, self.store, self.geometry)
        self._iter = None
        self._closed = False
        self._stopping = _worker_stop_flag() if cfg.data.num_workers > 0 else None
        if self.format == "zarr":
            reader = ZarrPatchReader(self.store, self.plan, normalization_mode=cfg.data.normalization,
                                     channels=STORE_CHANNELS)
            self.dataset = ZarrMicroBatches(reader, self.plan, self.geometry, rank=rank, world_size=world_size,
                                            micro_batch=self.micro_batch, accumulation=self.accumulation,
                                            augment_in_worker=not self.on_device)
            self.loader = make_loader(self.dataset, cfg, _CountFrom(self.start_step * self.accumulation), self.device,
                                      self._stopping)
        else:
            self.dataset = WdsMicroBatches(self.store, self.plan, self.geometry, cfg, rank=rank, world_size=world_size,
                                           micro_batch=self.micro_batch, accumulation=self.accumulation,
                                           start_step=self.start_step, augment_in_worker=not self.on_device)
            self.loader = make_loader(self.dataset, cfg, None, self.device, self._stopping)
        # Raw batches handed from workers to this process reuse a few shared-memory slabs per
        # worker; _to_device gives each back once augmented (see shared_slabs.py).
        self.pool = None
        if cfg.data.num_workers > 0 and self.on_device:
            self.pool = SlabPool(cfg.data.num_workers, cfg.data.prefetch_factor + 2)
            self.dataset.pool = self.pool

    @property
    def fingerprint(self) -> str:
        """Changes when the training cases or any sampling setting change (log it with checkpoints)."""
        return self.plan.fingerprint

    def __iter__(self) -> Iterator[tuple[int, list[dict]]]:
        if self._closed:
            raise RuntimeError("the train stream is closed")
        if self._iter is not None:
            raise RuntimeError("iterate a train stream once; build a new one to restart")
        self._iter = iter(self.loader)
        step = self.start_step
        while True:
            micro = [self._to_device(next(self._iter)) for _ in range(self.accumulation)]
            self._next_step = step + 1
            yield step, micro
            step += 1

    def _to_device(self, item: dict) -> dict:
        if "image" in item:  # augmented in a worker
            dev = self.device
            out = {"image": item["image"].to(dev, non_blocking=True),
                   "targets": [t.to(dev, non_blocking=True).long() for t in item["targets"]],
                   "sample_index": torch.as_tensor(item["sample_index"], dtype=torch.int64).to(dev, non_blocking=True)}
            if item.get("annotated") is not None:
                out["annotated"] = torch.as_tensor(item["annotated"], dtype=torch.bool)  # host, as finish()
            return out
        out = finish(item, self.geometry, self.device)  # nothing in ``out`` aliases the raw voxels
        if self.pool is not None:
            self.pool.release(item.get("slab"))
        return out

    def state_dict(self) -> dict:
        """``step`` is the step the next batch belongs to: a stream built with start_step=step continues exactly."""
        return {"seed": self.seed, "step": self._next_step}

    def close(self) -> None:
        """Stop the worker processes (idempotent, never blocks on a dead worker for long)."""
        self._closed = True
        if self._stopping is not None:
            self._stopping.value = 1  # from here on a worker's SIGTERM is torch's shutdown: exit
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):  # pragma: no cover - best effort at interpreter shutdown
        try:
            self.close()
        except Exception:
            pass


def build_train_stream(cfg: StreamConfig, *, rank: int, world_size: int, start_step: int, device: torch.device,
                       batched_spatial: bool | None = None, store: PreparedStore | None = None) -> TrainStream:
    """The trainer's data stream for one rank (see the module docstring).

    ``batched_spatial`` forces ``augment_batch``'s spatial path (None: by device; see ``Geometry``).
    """
    return TrainStream(cfg, rank=rank, world_size=world_size, start_step=start_step, device=device,
                       batched_spatial=batched_spatial, store=store)


# --------------------------------------------------------------------------------------------
# Validation cases
# --------------------------------------------------------------------------------------------


def load_validation_case(store: PreparedStore, cfg: StreamConfig, case_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image float32 [C, X, Y, Z] normalised as in training, label int64 [X, Y, Z], meta dict).

    Read from the Zarr store when there is one (whatever ``data.format``), else from its shard.
    """
    if store.has_zarr:
        h = CaseHandle(store, case_id, cfg.data.normalization, STORE_CHANNELS)
        try:
            shape = h.shape
            image = np.empty((STORE_CHANNELS, *shape), np.dtype(h.image.dtype).newbyteorder("="))
            label = np.empty(shape, h.label.dtype)
            h.image.read((0, 0, 0), shape, image[0]) if not h.image_has_channels else h.image.read((0, 0, 0, 0), (STORE_CHANNELS, *shape), image)
            h.label.read((0, 0, 0), shape, label)
        finally:
            h.close()  # one read per validation case: do not keep its shard files open
        meta, norm = h.meta, h.norm
    else:
        case = load_wds_case(store, case_id)
        image = np.asarray(case.image).reshape(STORE_CHANNELS, *case.shape[-3:])
        label = np.asarray(case.label)
        meta, norm = case.meta, normalization(store, case.meta, cfg.data.normalization, STORE_CHANNELS)
    # the training path's normalisation, op for op
    out = torch.empty(image.shape, dtype=torch.float32)
    normalize_into(out, torch.from_numpy(image), torch.from_numpy(norm))
    out = out.numpy()
    return out, label.astype(np.int64), dict(meta)


# --------------------------------------------------------------------------------------------
# The data source the trainer is given
# --------------------------------------------------------------------------------------------


class StoreDataSource:
    """The prepared store as the trainer's data source (``source.DataSource``): training streams
    per rank, and the validation split's cases. The store is opened once and kept."""

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg
        self._store: PreparedStore | None = None

    @property
    def store(self) -> PreparedStore:
        if self._store is None:
            self._store = open_training_store(self.cfg)
        return self._store

    def train_stream(self, *, rank: int, world_size: int, start_step: int, device: torch.device) -> TrainStream:
        return build_train_stream(self.cfg, rank=rank, world_size=world_size, start_step=start_step, device=device,
                                  store=self.store)

    def validation_case_ids(self) -> list[str]:
        """Case ids of ``data.val_splits`` in the store (sorted)."""
        return self.store.case_ids(self.cfg.data.val_splits)

    def validation_case_shape(self, case_id: str) -> tuple[int, ...]:
        """Spatial shape from the manifest (no voxel read): validation plans its forwards with it."""
        return tuple(int(x) for x in self.store.meta(case_id)["shape"][-3:])

    def validation_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
        return load_validation_case(self.store, self.cfg, case_id)
