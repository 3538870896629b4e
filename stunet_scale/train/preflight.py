"""One ``validate()``: every check that can fail a run, before any process group, backend or MLflow run exists.

The CLI, ``train --dry-run`` (``train/dry_run.py``) and every rank (``train/__main__.py``, before
``loop.run`` builds the Trainer) call :func:`validate`; there is no other set of checks to drift from
it. It builds on ``config.validate`` (the checks that need only the config) and adds what needs the
world size, the prepared store or the filesystem.

Why before startup and not where each thing is used: a missing ``data.root`` used to surface inside
the data stream, after DeepSpeed had partitioned the model and MLflow had opened a run (88 s for
STU-Net-H under ``accelerate launch``), and left that run RUNNING forever. Everything below reads
only the config, the launcher's environment and the filesystem, so each rank reaches the same
verdict on its own and exits with ``EXIT_CONFIG`` (2) without talking to its peers.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, StreamConfig, TrainConfig, world_batch_arithmetic
from ..config import validate as validate_config
from ..data.store import STORE_CHANNELS, PreparedStore, open_store, verify_wds_shards
from ..data.stream.loader import StoreDataSource, build_plan
from ..data.stream.readers import image_format
from ..data.stream.source import DataSourceFactory
from ..data.stream.transforms import Geometry

# Bytes one checkpoint holds per parameter, by backend (measured layouts, see checkpointing/manager.py):
# the safetensors portable copy is fp32 weights + fp32 momentum (8 B); DeepSpeed's native shards add
# its fp32 master weights, momentum and bf16 module copy (~10 B); FSDP2's DCP files fp32 weights +
# momentum (8 B). A 10% margin covers the small files (state, RNG, manifest, config).
CHECKPOINT_BYTES_PER_PARAM = {"none": 8, "ddp": 8, "deepspeed": 18, "fsdp2": 16}
MARGIN = 1.10


def launched_world_size() -> int:
    """The world size the launcher started, from its environment (no process group needed)."""
    from ..parallel.distributed import detect_launch_env

    return int(detect_launch_env()["world_size"])


def checkpoint_bytes(cfg: TrainConfig) -> int:
    """Disk one checkpoint of this run needs (estimate with margin; shapes only, no weights built)."""
    from ..models.flops import count_parameters

    per_param = CHECKPOINT_BYTES_PER_PARAM.get(cfg.distributed.backend, 18)
    return int(count_parameters(cfg.model) * per_param * MARGIN)


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(cfg: TrainConfig) -> None:
    """Room for at least one more checkpoint on the run dir's filesystem (a save writes before it prunes)."""
    need = checkpoint_bytes(cfg)
    where = _existing_parent(Path(cfg.run_dir))
    free = shutil.disk_usage(where).free
    if free < need:
        raise ConfigError(
            f"run_dir={cfg.run_dir!r}: {free / 2**30:.2f} GiB free on its filesystem ({where}), but one checkpoint of "
            f"this model needs ~{need / 2**30:.2f} GiB ({need} bytes); free space there or set run_dir= to a larger filesystem")


def check_init_from(cfg: TrainConfig) -> None:
    path = cfg.checkpoint.init_from
    if path and not Path(path).exists():
        raise ConfigError(f"checkpoint.init_from={path!r} does not exist; point it at an export dir, a "
                          f"model.safetensors or a released STU-Net .model/.pth file")


def check_backend_world(cfg: TrainConfig, world_size: int) -> None:
    if cfg.distributed.backend == "none" and world_size > 1:
        raise ConfigError(f"distributed.backend=none runs one process but {world_size} ranks were launched (or given to --dry-run "
                          f"as --world-size); "
                          "set distributed.backend=ddp, fsdp2 or deepspeed")


@dataclass(frozen=True)
class Validated:
    """What :func:`validate` established, for ``--dry-run``'s summary (nothing here is re-checked)."""

    world_size: int
    arithmetic: dict[str, int]  # config.world_batch_arithmetic at this world size
    store: PreparedStore | None  # None when a stand-in data source was given
    train_cases: int | None  # cases data.train_splits selects in the store


def validate(cfg: TrainConfig, world_size: int | None = None, data: DataSourceFactory | None = None) -> Validated:
    """Raise ConfigError (naming the key to change) for anything that would fail after startup.

    ``world_size``: the ranks to check for; None = what the launcher started (its environment).
    ``data``: the trainer's data-source factory (``Trainer(cfg, data=...)``); None or the prepared
    store's (``StoreDataSource``) checks ``data.root`` against the config, a stand-in (the tests'
    in-memory data) skips that.
    """
    validate_config(cfg)
    world = launched_world_size() if world_size is None else int(world_size)
    check_backend_world(cfg, world)
    arithmetic = world_batch_arithmetic(cfg, world)  # names schedule.global_batch / schedule.micro_batch
    if cfg.model.in_channels != STORE_CHANNELS:
        raise ConfigError(f"model.in_channels={cfg.model.in_channels}, but the prepared store holds "
                          f"{STORE_CHANNELS}-channel CT; set model.in_channels={STORE_CHANNELS}")
    store, train_cases = None, None
    if data is None or data is StoreDataSource:
        store = check_store(cfg)  # data.root, its manifest's class map, spacing, format, shards
        stream_cfg = StreamConfig.of(cfg)
        plan = build_plan(stream_cfg, store, Geometry(stream_cfg))  # data.train_splits selects cases
        train_cases = len(plan.cases)
    check_init_from(cfg)
    check_disk_space(cfg)
    return Validated(world_size=world, arithmetic=arithmetic, store=store, train_cases=train_cases)


# --------------------------------------------------------------------------------------------
# The config against the prepared store
# --------------------------------------------------------------------------------------------


def check_store(cfg: TrainConfig) -> PreparedStore:
    """Open ``data.root`` and check it against the config; ConfigError names the key to change.

    The only place WebDataset shards are verified against the manifest (``data.verify_shards``):
    once per rank before training, never inside the data stream.
    """
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
    if d.format == "zarr" and not store.has_zarr:
        raise ConfigError(f"data.format=zarr but {root} was prepared without a Zarr store; use data.format=wds "
                          f"or prepare with --format zarr/both")
    if d.format == "wds" and not store.manifest.get("wds_shards"):
        raise ConfigError(f"data.format=wds but {root} has no WebDataset shards; use data.format=zarr "
                          f"or prepare with --format wds/both")
    if d.format == "wds":
        # Before training, not mid-run: a truncated shard would otherwise surface hours in, when a
        # worker first reaches it (and a shard cut at a member boundary reads as a short, valid tar).
        problems = verify_wds_shards(root, store.manifest, full=d.verify_shards == "sha256")
        if problems:
            raise ConfigError(f"data.root={d.root!r}: {len(problems)} WebDataset shard(s) fail the pre-flight check "
                              f"against manifest.json: {'; '.join(problems[:5])}. Copy the shards again from where they "
                              f"were prepared, or prepare the dataset again into a new directory")
    return store


# --------------------------------------------------------------------------------------------
# Disk full during a save (the trainer's checkpoint path)
# --------------------------------------------------------------------------------------------


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python I/O, or safetensors' Rust error that only carries the OS error text."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "os error 28" in text or "No space left on device" in text or "Disk quota exceeded" in text


def disk_full_message(path: Path, cfg: TrainConfig) -> str:
    where = _existing_parent(Path(path))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    need = checkpoint_bytes(cfg)
    return (f"disk full while writing the checkpoint under {path}: one checkpoint needs ~{need} bytes "
            f"({need / 2**30:.2f} GiB), {max(free, 0)} bytes are free on {where}. The unfinished save was removed and the "
            f"previous checkpoint is still the resume point; free space (or lower checkpoint.keep_last) and rerun the "
            f"same command to resume")


__all__ = ["validate", "Validated", "check_store", "checkpoint_bytes", "check_disk_space", "is_disk_full", "disk_full_message",
           "CHECKPOINT_BYTES_PER_PARAM", "launched_world_size"]
