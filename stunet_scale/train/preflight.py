"""Checks that run on every rank before any process group, backend or MLflow run exists.

Why here and not where each thing is used: a missing ``data.root`` used to surface inside the data
stream, after DeepSpeed had partitioned the model and MLflow had opened a run (88 s for STU-Net-H
under ``accelerate launch``), and left that run RUNNING forever. Everything below reads only the
config, the launcher's environment and the filesystem, so each rank reaches the same verdict on its
own and exits with ``EXIT_CONFIG`` (2) without talking to its peers.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from ..config import ConfigError, TrainConfig

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
        raise ConfigError(f"distributed.backend=none runs one process but {world_size} were launched; "
                          "set distributed.backend=ddp, fsdp2 or deepspeed")


def preflight(cfg: TrainConfig, real_data: bool = True) -> None:
    """Raise ConfigError (naming the key) for anything that would fail after startup.

    ``real_data=False`` skips the prepared-store checks for the tests' in-memory data stand-ins.
    """
    world_size = launched_world_size()
    check_backend_world(cfg, world_size)
    from ..data.loader import Geometry, build_plan, open_checked_store, validate_data_config

    validate_data_config(cfg, world_size)  # batch arithmetic, loader knobs, augmentation ranges
    if real_data:
        store = open_checked_store(cfg)  # data.root, its manifest's class map, spacing, format
        build_plan(cfg, store, Geometry(cfg))  # data.train_splits selects cases
    check_init_from(cfg)
    check_disk_space(cfg)


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


__all__ = ["preflight", "checkpoint_bytes", "check_disk_space", "is_disk_full", "disk_full_message",
           "CHECKPOINT_BYTES_PER_PARAM", "launched_world_size"]
