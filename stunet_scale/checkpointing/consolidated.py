"""Full fp32 weights out of any training checkpoint, in one process, without a GPU.

This is what ``stunet-scale export`` builds on (issue 6) and what a user reaches for to inspect a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .commit import CheckpointError, list_checkpoints, resolve_newest_valid, verify
from .portable import DCPReader, PortableReader
from .state import CONFIG_FILE, STATE_FILE, TrainerState

# Wrappers that rename parameters; the released STU-Net keys have none of them. DDP/DeepSpeed and
# torch.compile put theirs in front, checkpoint/FSDP1 wrappers anywhere along the path.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WRAPPER_INFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@dataclass
class ConsolidatedCheckpoint:
    state_dict: dict[str, torch.Tensor]  # fp32, CPU, released STU-Net keys
    config: dict  # resolved TrainConfig of the run, as a plain dict
    step: int
    samples_seen: int
    meta: dict = field(default_factory=dict)  # path, backend, world_size, mlflow_run_id, git_revision, ...


def clean_key(key: str) -> str:
    """``module._orig_mod.conv_blocks_context.0...`` -> ``conv_blocks_context.0...``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES + WRAPPER_INFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    for infix in WRAPPER_INFIXES:
        key = key.replace("." + infix, ".")
    return key.replace("._orig_mod.", ".")


def find_checkpoint(path: str | Path) -> Path:
    """A run dir, its ``checkpoints/`` dir, or one checkpoint dir -> one verified checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / STATE_FILE).is_file():
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"{path} is not a valid checkpoint: {reason}")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not list_checkpoints(root):
        raise CheckpointError(f"{path}: no checkpoints found (expected a run dir, its checkpoints/ or a step_* dir)")
    found = resolve_newest_valid(root, env=None, quarantine=False)
    assert found is not None
    return found


def load_consolidated(path: str | Path) -> ConsolidatedCheckpoint:
    """Load full fp32 weights, resolved config and counters from a training checkpoint.

    ``path`` may be a run directory (its newest *valid* checkpoint is used; corrupt newer ones are
    skipped with an error log), its ``checkpoints/`` directory, or one ``step_*`` directory.
    Works for every backend (one process, DDP, FSDP2/DCP, DeepSpeed ZeRO 0-3) and any training
    world size, on CPU, without a process group. Memory: about one fp32 copy of the model
    (tensors are read one at a time from memory-mapped safetensors or DCP files).

    Returns a ``ConsolidatedCheckpoint`` with ``state_dict`` keyed exactly like the released
    STU-Net checkpoints (no ``module.``/``_orig_mod.`` prefixes), ``config`` (the run's resolved
    ``TrainConfig`` as a dict), ``step``, ``samples_seen`` and ``meta`` (checkpoint path, backend,
    world size, MLflow run id, git revision, run name).

    A DeepSpeed checkpoint written with ``checkpoint.portable_copy=false`` (or by any ZeRO 1-3 run
    without our portable copy) is consolidated by DeepSpeed's own ``zero_to_fp32`` from its native
    shards, on CPU; that path holds the ranks' flat fp32 partitions while it rebuilds the tensors.

    Raises ``CheckpointError`` naming the directory when nothing valid is found or a checkpoint
    holds no weights this function can read.
    """
    ckpt = find_checkpoint(path)
    state = TrainerState.from_file(ckpt / STATE_FILE)
    if (ckpt / "portable" / "index.json").is_file():
        reader = PortableReader(ckpt / "portable")
        source = "portable"
    elif state.backend == "fsdp2" and (ckpt / "native" / ".metadata").is_file():
        reader = DCPReader(ckpt / "native")
        source = "dcp"
    elif state.backend == "deepspeed" and (ckpt / "native").is_dir():
        reader = None
        raw = _deepspeed_fp32(ckpt / "native", ckpt)
        source = "zero_to_fp32"
    else:
        raise CheckpointError(
            f"{ckpt}: neither a portable/ copy of the weights nor native shards this tool can consolidate "
            f"(backend {state.backend!r})"
        )
    if reader is not None:
        raw = reader.state_dict()
        reader.close()
    state_dict = {clean_key(k): v.float().contiguous() for k, v in raw.items()}
    del raw
    config = yaml.safe_load((ckpt / CONFIG_FILE).read_text()) if (ckpt / CONFIG_FILE).is_file() else {}
    meta = {
        "path": str(ckpt),
        "source": source,
        "backend": state.backend,
        "zero_stage": state.zero_stage,
        "world_size": state.world_size,
        "mlflow_run_id": state.mlflow_run_id,
        "git_revision": state.git_revision,
        "run_name": state.run_name,
        "optimizer_steps": state.optimizer_steps,
        "skipped_nonfinite": state.skipped_nonfinite,
    }
    return ConsolidatedCheckpoint(state_dict, config, state.step, state.samples_seen, meta)


def _deepspeed_fp32(native: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from DeepSpeed's native ZeRO shards via its ``zero_to_fp32`` (any stage, world size).

    DeepSpeed picks its accelerator when imported; the conversion itself only ``torch.load``s to CPU,
    so it runs the same with ``DS_ACCELERATOR=cpu`` on a machine without a GPU.
    """
    import inspect

    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise CheckpointError(f"{ckpt}: a DeepSpeed checkpoint without a portable/ copy needs deepspeed ({e})") from None
    # The trainer saves under a fixed tag (parallel/deepspeed_engine.py) and writes no "latest" file;
    # a checkpoint saved by plain DeepSpeed has one, which tag=None reads.
    tags = [d.name for d in native.iterdir() if d.is_dir() and any(d.glob("*model_states.pt"))]
    tag = "native" if "native" in tags else (tags[0] if len(tags) == 1 else None)
    kwargs = {}
    if "lazy_mode" in inspect.signature(get_fp32_state_dict_from_zero_checkpoint).parameters:
        kwargs["lazy_mode"] = True  # tensors materialise one by one below instead of all at once
    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(native), tag=tag, **kwargs)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"{ckpt}: DeepSpeed's zero_to_fp32 could not consolidate {native} "
                              f"({type(e).__name__}: {e})") from None
    # lazy entries become real CPU tensors on .contiguous(); real tensors are returned as they are
    return {k: v.contiguous() for k, v in sd.items()}
