"""Save and find checkpoints for the trainer: what goes in one, and how a resume is planned.

One checkpoint directory::

    step_000012500/
      COMMITTED, manifest.json     the commit protocol (commit.py)
      trainer_state.json           counters, sample-plan position, MLflow run id, world size, git revision
      config.yaml                  the resolved config of the run that wrote it
      rng/rank_00000.pt ...        python/numpy/torch(/cuda) RNG per rank
      native/                      the backend's own sharded state: DeepSpeed tag dir, or DCP (FSDP2)
      portable/                    world-size-independent fp32 params + momentum (portable.py)

Resume rules: the same backend at the same world size loads ``native/`` (bit-exact, DeepSpeed's
own format included); anything else (another world size, stage or backend) loads ``portable/``
(or DCP, which reshards), and the sample plan continues at the same global sample index.
``checkpoint.portable_copy=false`` refuses the second kind (native resume only); ``portable/`` is
written by every save regardless, because export, ``load_pretrained`` and ``predict`` read only it.

Trust boundary: resume unpickles ``native/`` (DeepSpeed's ``*_states.pt``, DCP's ``.metadata``):
it is the user's own run. RNG files are read with ``weights_only=True``; everything else is JSON,
YAML (safe loader) or safetensors.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import save_config
from ..parent_watch import exit_if_parent_gone
from .commit import (
    CheckpointError,
    apply_retention,
    clean_stale_tmp,
    commit,
    list_checkpoints,
    resolve_newest_valid,
    step_dirname,
    verify,
)
from .portable import DCPReader, PortableReader, write_portable
from .state import CONFIG_FILE, STATE_FILE, TrainerState, load_rng, save_rng

log = logging.getLogger("stunet_scale.checkpointing")


@dataclass
class ResumePlan:
    path: Path
    state: TrainerState
    mode: str  # "native" | "portable" | "dcp"
    reason: str

    def reader(self):
        if self.mode == "dcp":
            return DCPReader(self.path / "native")
        return PortableReader(self.path / "portable")


class CheckpointManager:
    def __init__(self, run_dir: Path, ckpt_cfg, env, fault_hook=None):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.cfg = ckpt_cfg
        self.env = env
        self.fault_hook = fault_hook  # test hook: called with stage names during a save

    # ---- save -------------------------------------------------------------------------------

    def save(self, step: int, backend, state: TrainerState, config) -> tuple[Path, dict]:
        """Collective. Returns (committed directory, norms measured while writing)."""
        t0 = time.time()
        tmp = self.root / (step_dirname(step) + ".tmp")
        if self.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.env.barrier()
        if backend.native_format != "none":
            backend.save_native(str(tmp / "native"))
        # Every backend, always: portable/ (safetensors) is all that export, load_pretrained and
        # predict read, because native/ files are pickles (README, trust boundary).
        norms = write_portable(backend, tmp / "portable", self.env)
        save_rng(tmp, self.env.rank)
        if self.fault_hook:
            self.fault_hook("files_written")
        if self.env.is_main:
            state.norms = norms
            (tmp / STATE_FILE).write_text(state.to_json())
            save_config(config, tmp / CONFIG_FILE)
        # a rank that outlived its launcher must not publish a step into a run dir a new job may own
        exit_if_parent_gone(f"before committing {tmp.name}")
        final = commit(tmp, self.env, step, extra={"backend": backend.name, "world_size": self.env.world_size},
                       hook=self.fault_hook)
        if self.env.is_main:
            removed = apply_retention(self.root, self.cfg.keep_last, self.cfg.milestone_every_steps)
            if removed:
                log.info("retention removed %s", ", ".join(removed))
        self.env.barrier()
        log.info("saved %s in %.1f s", final, time.time() - t0)
        return final, norms

    # ---- resume -----------------------------------------------------------------------------

    def existing(self) -> list[Path]:
        return [p for _, p in list_checkpoints(self.root)]

    def prepare(self) -> None:
        if self.env.is_main:
            removed = clean_stale_tmp(self.root)
            if removed:
                log.warning("removed unfinished checkpoint(s) from an interrupted save: %s", ", ".join(removed))
        self.env.barrier()

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from under ``checkpoint.resume``; None = start fresh."""
        if resume == "never":
            if self.existing():
                from ..config import ConfigError

                raise ConfigError(
                    f"checkpoint.resume=never but {self.root} already holds checkpoints; a fresh run would "
                    "overwrite them. Use a new run_dir (or checkpoint.resume=auto)"
                )
            return None
        if resume == "auto":
            return resolve_newest_valid(self.root, self.env)
        target = Path(resume)
        if (target / "checkpoints").is_dir():
            target = target / "checkpoints"
        if target.is_dir() and not (target / STATE_FILE).exists() and list_checkpoints(target):
            found = resolve_newest_valid(target, self.env, quarantine=False)
            if found is None:
                raise CheckpointError(f"checkpoint.resume={resume}: no checkpoint found there")
            return found
        ok, reason = verify(target, self.env)
        if not ok:
            raise CheckpointError(f"checkpoint.resume={resume} is not a valid checkpoint: {reason}")
        return target

    def plan(self, path: Path, backend_name: str, zero_stage: int | None) -> ResumePlan:
        state = TrainerState.from_file(path / STATE_FILE)
        same = state.backend == backend_name and state.world_size == self.env.world_size and (
            backend_name != "deepspeed" or state.zero_stage == zero_stage
        )
        has_native = (path / "native").is_dir()
        has_portable = (path / "portable" / "index.json").is_file()
        if backend_name == "fsdp2" and state.backend == "fsdp2":
            return ResumePlan(path, state, "native", "DCP reshards to any world size")
        if same and (has_native or state.backend in ("none", "ddp")):
            mode = "native" if has_native else "portable"
            return ResumePlan(path, state, mode, "same backend and world size")
        why = (f"saved by {state.backend} (zero_stage={state.zero_stage}) on {state.world_size} rank(s), "
               f"resuming with {backend_name} (zero_stage={zero_stage}) on {self.env.world_size}")
        if not self.cfg.portable_copy:
            raise CheckpointError(
                f"{path}: {why}, and checkpoint.portable_copy=false allows only a native (bit-exact) resume. "
                f"Resume with the same backend and {state.world_size} rank(s), or set checkpoint.portable_copy=true"
            )
        if has_portable:
            return ResumePlan(path, state, "portable", why)
        if state.backend == "fsdp2":
            return ResumePlan(path, state, "dcp", why)
        raise CheckpointError(
            f"{path}: {why}, but it has no portable/ copy (saved before every save wrote one). "
            f"Resume with the same backend and {state.world_size} rank(s)"
        )

    def load_rng(self, path: Path) -> dict | None:
        return load_rng(path, self.env.rank)
