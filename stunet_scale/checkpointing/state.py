"""Our own part of a checkpoint: counters, sample-plan position, RNG per rank, run identity.

``trainer_state.json`` is plain JSON (readable with ``cat``), written by rank 0. RNG states are
one small file per rank, saved with ``torch.save`` and read back with ``weights_only=True``
(tensors, ints, tuples only: numpy's state is converted to a tensor first).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps attempted (= position in the sample plan)
    samples_seen: int = 0  # step * global_batch; what a resume at another batch size keeps
    optimizer_steps: int = 0  # steps whose update was applied
    skipped_nonfinite: int = 0  # steps skipped because some rank saw a non-finite loss/grad
    skipped_spikes: int = 0  # finite-loss steps skipped as spikes (checkpoint.spike_factor), also in skipped_nonfinite's streaks
    consecutive_skips: int = 0  # skips in a row (non-finite or spike); a checkpoint saved with > 0 is no rollback target
    # Global losses of the last checkpoint.spike_window accepted steps, oldest first: the spike
    # detector's reference. Saved with every checkpoint so a resumed run makes the same decisions.
    loss_window: list = field(default_factory=list)
    rollbacks: list = field(default_factory=list)  # [{"from_step", "to_step", "skipped_samples", "time"}]
    seed: int = 0  # cfg.seed of the run; a resume with another seed stops (check_same_plan)
    plan_fingerprint: str | None = None  # SamplePlan.fingerprint of the stream; None = saved before it was stored
    stream: dict = field(default_factory=dict)  # the data stream's state_dict() ({"seed", "step"})
    world_size: int = 1
    backend: str = "none"
    zero_stage: int | None = None
    global_batch: int = 2
    mlflow_run_id: str | None = None
    run_name: str | None = None
    elapsed_s: float = 0.0
    git_revision: str | None = None
    backend_extra: dict = field(default_factory=dict)
    norms: dict = field(default_factory=dict)  # {"param_sq", "momentum_sq"} when measured at save
    best: dict = field(default_factory=dict)
    version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> TrainerState:
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except (UnicodeDecodeError, ValueError) as e:
            from .commit import CheckpointError

            raise CheckpointError(f"{path}: not a trainer state (plain JSON expected: {str(e)[:120]})") from None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_same_plan(saved: TrainerState, where: Path, *, seed: int, fingerprint: str | None,
                    allow_change: bool) -> list[str]:
    """Compare a checkpoint's seed and sample-plan fingerprint with the resuming run's.

    A different value means the resumed run would not continue the interrupted sample sequence
    (another seed, store, sampling setting or global batch): that is a ConfigError (exit 2) naming
    both values, unless ``checkpoint.allow_plan_change`` is set, when the differences come back as
    warnings to log. ``fingerprint=None`` skips the plan (not known yet, or a stream without one); a
    checkpoint saved before the fingerprint was stored has None too and is not compared.
    """
    from ..config import ConfigError

    changes = []
    if saved.seed != seed:
        changes.append(f"seed {saved.seed} in the checkpoint, {seed} now")
    if fingerprint is not None and saved.plan_fingerprint is not None and saved.plan_fingerprint != fingerprint:
        changes.append(f"sample-plan fingerprint {saved.plan_fingerprint} in the checkpoint, {fingerprint} now "
                       f"(the store, a sampling/augmentation setting or schedule.global_batch changed)")
    if changes and not allow_change:
        raise ConfigError(
            f"{where}: resuming would not continue the same sample sequence: {'; '.join(changes)}. Restore the "
            f"original settings, start a new run_dir, or set checkpoint.allow_plan_change=true to continue anyway"
        )
    return [f"{where}: checkpoint.allow_plan_change=true: continuing with {c}" for c in changes]


def capture_rng() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_python_state(s):
    # weights_only loading returns lists where tuples were saved
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def rng_file(directory: Path, rank: int) -> Path:
    return Path(directory) / "rng" / f"rank_{rank:05d}.pt"


def save_rng(directory: Path, rank: int) -> None:
    path = rng_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng(), path)


def load_rng(directory: Path, rank: int) -> dict | None:
    path = rng_file(directory, rank)
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank streams for anything random outside the sample plan (which is counter-based)."""
    mixed = (seed * 1_000_003 + rank) % (2**31)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)
