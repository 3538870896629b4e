"""The one data API the trainer uses, whatever the reader (Zarr random access or WebDataset tars).

    from stunet_scale.data.loader import build_train_stream, list_validation_cases, load_validation_case

    with build_train_stream(cfg, rank=r, world_size=w, start_step=s, device=dev) as stream:
        for step, micro_batches in stream:      # never ends on its own
            ...                                 # len(micro_batches) == grad_accumulation
        ckpt["data"] = stream.state_dict()      # {"seed", "step"}: all a Zarr resume needs

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
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import ConfigError, TrainConfig, world_batch_arithmetic
from ..train.faults import Faults
from .augment import augment_batch, deep_supervision_strides, initial_patch_size, normalize_into
from .plan import SamplePlan
from .readers import (
    CaseHandle,
    ZarrPatchReader,
    image_format,
    normalization,
    plan_cases,
)
from .shared_slabs import SlabPool
from .store import PreparedStore, open_store, verify_wds_shards

STORE_CHANNELS = 1  # the prepared store holds single-channel CT


# --------------------------------------------------------------------------------------------
# Validation of the config against the store
# --------------------------------------------------------------------------------------------


def _check_range(key: str, value, lo=None, hi=None, positive=False) -> None:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and value[0] <= value[1]):
        raise ConfigError(f"{key} must be [low, high] with low <= high, got {value}")
    if positive and value[0] <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")
    if lo is not None and value[0] < lo or hi is not None and value[1] > hi:
        raise ConfigError(f"{key} must lie in [{lo}, {hi}], got {value}")


def validate_augmentation(cfg) -> None:
    """Ranges and probabilities of ``augmentation.*``; errors name the key."""
    a = cfg.augmentation
    for name in ("rotation_p", "scaling_p", "noise_p", "blur_p", "brightness_p", "contrast_p", "lowres_p",
                 "gamma_inverted_p", "gamma_p", "blur_per_channel_p", "lowres_per_channel_p"):
        v = getattr(a, name)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"augmentation.{name} must be a probability in [0, 1], got {v}")
    if not 0 <= a.rotation_max_deg <= 180:
        raise ConfigError(f"augmentation.rotation_max_deg must be in [0, 180], got {a.rotation_max_deg}")
    _check_range("augmentation.scaling_range", a.scaling_range, positive=True)
    _check_range("augmentation.noise_variance", a.noise_variance, lo=0)
    _check_range("augmentation.blur_sigma", a.blur_sigma, positive=True)
    _check_range("augmentation.brightness_range", a.brightness_range, positive=True)
    _check_range("augmentation.contrast_range", a.contrast_range, positive=True)
    _check_range("augmentation.lowres_zoom", a.lowres_zoom, hi=1.0, positive=True)
    _check_range("augmentation.gamma_range", a.gamma_range, positive=True)
    if any(ax not in (0, 1, 2) for ax in a.mirror_axes) or len(set(a.mirror_axes)) != len(a.mirror_axes):
        raise ConfigError(f"augmentation.mirror_axes must be distinct axes among 0, 1, 2, got {a.mirror_axes}")


def validate_data_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Checks that need no store: batch arithmetic, loader knobs, augmentation ranges."""
    d = cfg.data
    world_batch_arithmetic(cfg, world_size)  # raises naming schedule.global_batch / micro_batch
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
    if d.prefetch_factor < 1:
        raise ConfigError(f"data.prefetch_factor must be >= 1, got {d.prefetch_factor}")
    if d.wds_buffer_cases < 1 or d.wds_patches_per_case < 1:
        raise ConfigError("data.wds_buffer_cases and data.wds_patches_per_case must be >= 1")
    if d.case_weighting == "split" and d.split_weights and len(d.split_weights) != len(d.train_splits):
        raise ConfigError(f"data.split_weights needs one weight per data.train_splits entry "
                          f"({len(d.train_splits)}: {d.train_splits}), got {d.split_weights}")
    if any(w < 0 for w in d.split_weights) or (d.split_weights and sum(d.split_weights) <= 0):
        raise ConfigError(f"data.split_weights must be >= 0 and not all 0, got {d.split_weights}")
    if cfg.model.in_channels != STORE_CHANNELS:
        raise ConfigError(f"model.in_channels={cfg.model.in_channels}, but the prepared store holds "
                          f"{STORE_CHANNELS}-channel CT; set model.in_channels={STORE_CHANNELS}")
    validate_augmentation(cfg)


def open_checked_store(cfg: TrainConfig, need: str | None = None) -> PreparedStore:
    """Open ``data.root`` and check it against the config; ConfigError names the key to change."""
    d = cfg.data
    root = Path(d.root)
    if not (root / "manifest.json").is_file():
        what = "does not exist" if not root.exists() else "has no manifest.json (not a finished prepared dataset)"
        raise ConfigError(f"data.root={d.root!r} {what}. Prepare one with `stunet-scale prepare SOURCE {d.root}` "
                          f"(or `stunet-scale demo-data RAW && stunet-scale prepare RAW {d.root}` for the demo)")
    store = open_store(root)
    spacing = [float(s) for s in store.target_spacing]
    if any(abs(a - b) > 1e-6 for a, b in zip(spacing, d.spacing)) or len(spacing) != len(d.spacing):
        raise ConfigError(f"data.spacing={d.spacing} but {root}/manifest.json was prepared at {spacing} mm; set "
                          f"data.spacing={spacing} or prepare the data again with --spacing")
    if store.class_map_name != d.class_map:
        raise ConfigError(f"data.class_map={d.class_map!r} but {root} was prepared with class map "
                          f"{store.class_map_name!r}; set data.class_map={store.class_map_name!r}")
    if store.num_classes != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but class map {store.class_map_name!r} of "
                          f"{root} has {store.num_classes} labels (background included); set model.num_classes="
                          f"{store.num_classes}")
    channels = sorted({int(store.meta(c).get("channels", 1)) for c in store.case_ids()})
    if channels != [STORE_CHANNELS]:
        raise ConfigError(f"{root} holds {channels}-channel images; the training stream reads single-channel "
                          f"stores (model.in_channels={STORE_CHANNELS}); multi-channel data is not supported yet")
    image_format(store)  # int16 (CT) or float32, else a clear error
    fmt = need or d.format  # "any": validation reads whichever the store has
    if fmt == "zarr" and not store.has_zarr:
        raise ConfigError(f"data.format=zarr but {root} was prepared without a Zarr store; use data.format=wds "
                          f"or prepare with --format zarr/both")
    if fmt == "wds" and not store.manifest.get("wds_shards"):
        raise ConfigError(f"data.format=wds but {root} has no WebDataset shards; use data.format=zarr "
                          f"or prepare with --format wds/both")
    if fmt == "wds":
        # Before training, not mid-run: a truncated shard would otherwise surface hours in, when a
        # worker first reaches it (and a shard cut at a member boundary reads as a short, valid tar).
        problems = verify_wds_shards(root, store.manifest, full=d.verify_shards == "sha256")
        if problems:
            raise ConfigError(f"data.root={d.root!r}: {len(problems)} WebDataset shard(s) fail the pre-flight check "
                              f"against manifest.json: {'; '.join(problems[:5])}. Copy the shards again from where they "
                              f"were prepared, or prepare the dataset again into a new directory")
    return store


def _augment_on_device(cfg: TrainConfig, device: torch.device) -> bool:
    mode = cfg.augmentation.device
    if mode == "gpu":
        return True
    if mode == "cpu":
        return False
    return device.type == "cuda"


# --------------------------------------------------------------------------------------------
# Datasets behind the DataLoader
# --------------------------------------------------------------------------------------------


class Geometry:
    """Patch sizes and deep-supervision strides derived once from the config."""

    def __init__(self, cfg: TrainConfig):
        a = cfg.augmentation
        self.patch = [int(p) for p in cfg.data.patch_size]
        spatial = a.enabled and (a.rotation_p > 0 or a.scaling_p > 0)
        self.initial = initial_patch_size(self.patch, a.rotation_max_deg, rotation_enabled=a.rotation_p > 0) \
            if spatial else list(self.patch)
        # the initial patch never shrinks below the final one and keeps the centre voxel aligned
        self.initial = [max(i, p) for i, p in zip(self.initial, self.patch)]
        self.ds_strides = deep_supervision_strides(cfg.model.resolved().pool_strides, cfg.model.deep_supervision)
        self.label_interpolation = a.label_interpolation
        # augment_batch's batched_spatial: None picks by device (one batched grid_sample off the
        # CPU, per-sample boxes on it); True/False forces a path (tests run the GPU path on a CPU)
        self.batched_spatial: bool | None = None


def build_plan(cfg: TrainConfig, store: PreparedStore, geometry: Geometry) -> SamplePlan:
    d = cfg.data
    cases = plan_cases(store, d.train_splits)
    if not cases:
        have = sorted(store.manifest.get("stats", {}).get("splits", {}))
        raise ConfigError(f"data.train_splits={d.train_splits} selects no case of {d.root} (its splits: {have})")
    try:
        return SamplePlan(cases, seed=cfg.seed, global_batch=cfg.schedule.global_batch, patch=geometry.patch,
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


def finish(raw: dict, geometry: Geometry, device: torch.device, in_worker: bool = False) -> dict:
    """Raw micro-batch -> the trainer's dict, augmented on ``device``.

    ``in_worker``: labels stay in their stored dtype (uint8/int16) for the trip to the main
    process, which widens them to int64 on the device (``TrainStream._to_device``).
    """
    dtype = raw["crop_label"].dtype if in_worker else torch.int64
    image, targets = augment_batch(raw, patch=geometry.patch, initial=geometry.initial, ds_strides=geometry.ds_strides,
                                   label_interpolation=geometry.label_interpolation, device=device, label_dtype=dtype,
                                   batched_spatial=getattr(geometry, "batched_spatial", None))
    index = raw["sample_index"]  # numpy: a worker sends it pickled, not in its own shared segment
    annotated = raw.get("annotated")  # numpy bool [m, C] or None (a reader that does not know)
    if not in_worker:
        index = torch.as_tensor(index, dtype=torch.int64).to(device, non_blocking=True)
        if annotated is not None:
            annotated = torch.as_tensor(annotated, dtype=torch.bool)  # stays on the host (see above)
    out = {"image": image, "targets": targets, "sample_index": index}
    if annotated is not None:
        out["annotated"] = annotated
    return out


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
    worker ... is killed by signal: Terminated" instead of saving a checkpoint (reliability.md §6 row
    12). Here a worker ignores SIGUSR1/SIGUSR2 and ignores SIGTERM while its main process is alive and
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


def make_loader(dataset, cfg: TrainConfig, sampler=None, device: torch.device | None = None, stopping=None):
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

    def __init__(self, cfg: TrainConfig, *, rank: int, world_size: int, start_step: int, device: torch.device,
                 batched_spatial: bool | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        validate_data_config(cfg, world_size)
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.seed = int(cfg.seed)
        self.start_step = int(start_step)
        self._next_step = self.start_step
        arith = world_batch_arithmetic(cfg, world_size)
        self.accumulation = arith["grad_accumulation"]
        self.micro_batch = cfg.schedule.micro_batch
        self.geometry = Geometry(cfg)
        self.geometry.batched_spatial = batched_spatial
        self.on_device = _augment_on_device(cfg, self.device)
        self.format = cfg.data.format
        self.store = open_checked_store(cfg)
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
            from .webdataset_reader import WdsMicroBatches

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


def build_train_stream(cfg: TrainConfig, *, rank: int, world_size: int, start_step: int, device: torch.device,
                       batched_spatial: bool | None = None) -> TrainStream:
    """The trainer's data stream for one rank (see the module docstring).

    ``batched_spatial`` forces ``augment_batch``'s spatial path (None: by device; see ``Geometry``).
    """
    return TrainStream(cfg, rank=rank, world_size=world_size, start_step=start_step, device=device,
                       batched_spatial=batched_spatial)


# --------------------------------------------------------------------------------------------
# Validation cases
# --------------------------------------------------------------------------------------------


def list_validation_cases(cfg: TrainConfig) -> list[str]:
    """Case ids of ``data.val_splits`` in the store (sorted)."""
    return open_checked_store(cfg, need="any").case_ids(cfg.data.val_splits)


def load_validation_case(cfg: TrainConfig, case_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image float32 [C, X, Y, Z] normalised as in training, label int64 [X, Y, Z], meta dict).

    Read from the Zarr store when there is one (whatever ``data.format``), else from its shard.
    """
    store = open_checked_store(cfg, need="any")
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
        from .webdataset_reader import load_wds_case

        case = load_wds_case(store, case_id)
        image = np.asarray(case.image).reshape(STORE_CHANNELS, *case.shape[-3:])
        label = np.asarray(case.label)
        meta, norm = case.meta, normalization(store, case.meta, cfg.data.normalization, STORE_CHANNELS)
    # the training path's normalisation, op for op
    out = torch.empty(image.shape, dtype=torch.float32)
    normalize_into(out, torch.from_numpy(image), torch.from_numpy(norm))
    out = out.numpy()
    return out, label.astype(np.int64), dict(meta)
