"""Full fp32 weights out of any training checkpoint, in one process, without a GPU.

This is what ``stunet-scale export`` builds on (issue 6) and what a user reaches for to inspect a run.
It reads safetensors and JSON/YAML only; the backends' pickled native files are read by
``trust_native.py`` alone, the explicit conversion of a user's own old checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .commit import CheckpointError, list_checkpoints, resolve_newest_valid, verify
from .portable import PortableReader
from .state import CONFIG_FILE, STATE_FILE, TrainerState

# Wrappers that rename parameters; the released STU-Net keys have none of them. DDP/DeepSpeed and
# torch.compile put theirs in front, checkpoint/FSDP1 wrappers anywhere along the path.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WRAPPER_INFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class NoPortableCopy(CheckpointError):
    """A valid training checkpoint without ``portable/``: only its pickled native files hold the weights."""


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
    Works for every backend (one process, DDP, FSDP2, DeepSpeed ZeRO 0-3) and any training
    world size, on CPU, without a process group. Memory: about one fp32 copy of the model
    (tensors are read one at a time from memory-mapped safetensors files).

    Only the checkpoint's ``portable/`` safetensors copy, ``trainer_state.json`` and ``config.yaml``
    are read: nothing is unpickled, so a checkpoint handed over by someone else cannot run code here
    (export, ``load_pretrained`` and ``predict`` all come through this function). The backend's own
    ``native/`` files (DeepSpeed ``*_states.pt``, DCP ``.metadata``) are pickles and are never opened;
    a checkpoint without ``portable/`` (written before every save wrote one) is refused with the
    command that adds the copy from the user's own, trusted run (``trust_native.py``).

    Returns a ``ConsolidatedCheckpoint`` with ``state_dict`` keyed exactly like the released
    STU-Net checkpoints (no ``module.``/``_orig_mod.`` prefixes), ``config`` (the run's resolved
    ``TrainConfig`` as a dict), ``step``, ``samples_seen`` and ``meta`` (checkpoint path, backend,
    world size, MLflow run id, git revision, run name).

    Raises ``CheckpointError`` naming the directory when nothing valid is found or a checkpoint
    holds no portable copy.
    """
    ckpt = find_checkpoint(path)
    state = TrainerState.from_file(ckpt / STATE_FILE)
    if not (ckpt / "portable" / "index.json").is_file():
        raise NoPortableCopy(no_portable_message(ckpt, state.backend))
    reader = PortableReader(ckpt / "portable")
    try:
        raw = reader.state_dict()
    finally:
        reader.close()
    state_dict = {clean_key(k): v.float().contiguous() for k, v in raw.items()}
    del raw
    config = _read_config(ckpt / CONFIG_FILE)
    meta = {
        "path": str(ckpt),
        "source": "portable",
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


def _read_config(path: Path) -> dict:
    """The run's resolved config, with the safe YAML loader: a ``!!python/...`` tag is refused, never run."""
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: not a plain YAML config ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a mapping of config sections, found {type(config).__name__}")
    return config


def no_portable_message(ckpt: Path, backend: str) -> str:
    """The refusal for a checkpoint without ``portable/``: why, and the one command that fixes it."""
    return (
        f"{ckpt}: no portable/ copy of the weights (saved by an older stunet-scale, which wrote none for FSDP2 "
        f"or with checkpoint.portable_copy=false). Its native/ files ({backend}) are pickles, which can run code "
        f"when read, so export, load_pretrained and predict never open them. If this checkpoint comes from "
        f"your own run, add the safe copy once, knowingly: "
        f"python -m stunet_scale.checkpointing.trust_native --trust-native {ckpt} "
        f"(or resume the run with stunet-scale train for one more save, which writes portable/)"
    )
