"""What a training run writes about itself, one call per event; the Trainer decides, this records.

Rank 0 writes everything; on the other ranks every method is a no-op except the collectives of
``launched`` and the MLflow start (``Tracker`` is a no-op off rank 0). In the run directory:

    config.yaml            the resolved config (every default filled in), MLflow artifact "config"
    git_revision.txt       the checkout's HEAD (+ "-dirty"), or "unknown"
    launch_command.txt     the command as launched (torchrun/accelerate/srun prefix included)
    launches.jsonl         one line per start or requeue: time, host, command, revision, world size, Slurm ids
    metrics.jsonl          every metric row (tracking.MetricsLog): train, val, pseudo_dice, checkpoint,
                           resume, rollback, straggler, preempted
    rollbacks.jsonl        one line per rollback: from/to step and the skipped global sample range
    REQUEUE                written on a preemption exit (step, signal, time); removed when the run finishes
    init_from_report.txt   what checkpoint.init_from loaded, re-initialised and left out
    plots/                 progress.png, val_dice.png, val_preview_step*.png (also MLflow artifacts "plots")
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from collections import deque
from pathlib import Path

import torch

from .. import config as config_mod
from ..config import TrainConfig, flatten
from ..models import train_step_flops
from ..parallel.distributed import hostname
from ..tracking import (
    Console,
    MetricsLog,
    Tracker,
    git_revision,
    peak_rss_bytes,
    plot_class_dice,
    plot_preview,
    plot_progress,
)
from .schedule import Schedule
from .validate import SURFACE_KEYS

log = logging.getLogger("stunet_scale.train")


class RunReport:
    """The run's records, metrics, plots, console and MLflow run, for one Trainer."""

    def __init__(self, cfg: TrainConfig, env, run_dir: Path, schedule: Schedule):
        self.cfg, self.env, self.run_dir, self.schedule = cfg, env, Path(run_dir), schedule
        self.is_main = env.is_main
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", env.is_main)
        self.tracker: Tracker | None = None  # started by start_tracking, once the checkpoint's run id is known
        self.console: Console | None = None
        self.flops_per_sample = train_step_flops(cfg.model, tuple(cfg.data.patch_size), 1)
        # single steps are noisy (one global batch); the mean over the log interval is not
        self._recent_losses: deque[float] = deque(maxlen=cfg.tracking.log_every_steps)

    # ---- start ----------------------------------------------------------------------------------

    def launched(self, argv: list[str] | None) -> str | None:
        """Write the run files (config, revision, command, launches.jsonl); returns the git revision.

        Collective: the revision costs two subprocesses, so rank 0 computes it and broadcasts it;
        the barrier keeps every rank from going on before the files exist.
        """
        env = self.env
        rev = env.broadcast_object(git_revision() if env.is_main else None)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config_mod.save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "git_revision.txt").write_text((rev or "unknown") + "\n")
            command = launch_command(argv, env.launcher)
            (self.run_dir / "launch_command.txt").write_text(command + "\n")
            record = {"time": time.time(), "host": hostname(), "command": command, "git_revision": rev,
                      "world_size": env.world_size, "launcher": env.launcher,
                      "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                      "torch": torch.__version__}
            with open(self.run_dir / "launches.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        env.barrier()
        return rev

    def start_tracking(self, run_id: str | None, run_name: str, git_rev: str | None) -> str | None:
        """Start (or, with the checkpoint's ``run_id``, continue) the MLflow run; returns its id (rank 0's)."""
        env, cfg = self.env, self.cfg
        self.tracker = Tracker(cfg.tracking, self.run_dir, env.rank, run_id=run_id, run_name=run_name,
                               params=flatten(cfg) if env.is_main else None,
                               tags={"git_revision": git_rev or "unknown", "backend": cfg.distributed.backend,
                                     "world_size": env.world_size})
        if env.is_main and self.tracker.enabled:
            self.tracker.log_artifact(self.run_dir / "config.yaml", "config")
        return self.tracker.run_id

    def open_console(self, start_step: int) -> None:
        self.console = Console(self.schedule.stop_step, start_step, self.cfg.tracking.log_every_steps, self.is_main)

    def initialized_from(self, path: str, report) -> None:
        """checkpoint.init_from loaded ``path``; ``report`` says what was loaded and what was not."""
        if self.is_main:
            log.info("initialised from %s: %s", path, report)
            (self.run_dir / "init_from_report.txt").write_text(str(report) + "\n")

    def resumed(self, plan, step: int, norms: dict) -> None:
        """A checkpoint (``plan``: checkpointing.manager.ResumePlan) was loaded; training continues at ``step``."""
        if not self.is_main:
            return
        saved = plan.state
        log.info("resumed from %s at step %d (%d samples; %s, %s)", plan.path, step, saved.samples_seen,
                 plan.mode, plan.reason)
        self._warn_config_drift(plan.path)
        self.metrics.write(
            {"kind": "resume", "step": step, "from": str(plan.path), "mode": plan.mode,
             "saved_world_size": saved.world_size, "world_size": self.env.world_size, "saved_norms": saved.norms, **norms})

    def _warn_config_drift(self, path: Path) -> None:
        try:
            old = flatten(config_mod.load_config(path / "config.yaml", validate_config=False))
        except Exception:  # a warning only; an unreadable old config is not this run's problem
            return
        new = flatten(self.cfg)
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v and k not in ("run_dir", "checkpoint.resume")}
        if diff:
            log.warning("config differs from the checkpoint's: %s", "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))

    # ---- during training --------------------------------------------------------------------------

    def train_step(self, m: dict, state) -> None:
        """One step's row (``m`` from Trainer.train_step plus timings; ``state``: TrainerState):
        to the console every step, to metrics.jsonl and MLflow every log interval, on a skip and at the end."""
        if not self.is_main:
            return
        cfg, sched, env = self.cfg, self.schedule, self.env
        step = m["step"]
        dt = max(m["step_time"], 1e-9)
        rec = {
            "kind": "train", "step": step, "epoch": sched.epoch(step), "samples_seen": sched.samples_seen(step),
            "lr": sched.lr(step - 1), "step_time": m["step_time"], "data_wait_frac": m["data_wait"] / dt,
            "patches_per_s": cfg.schedule.global_batch / dt,
            "tflops_per_gpu": self.flops_per_sample * cfg.schedule.global_batch / dt / env.world_size / 1e12,
            "skipped_nonfinite": state.skipped_nonfinite, "skipped_spikes": state.skipped_spikes,
            "host_rss_gib": peak_rss_bytes() / 2**30,
            "total_steps": sched.stop_step, "eta_s": (sched.stop_step - step) * dt,
        }
        for key in ("loss", "dice", "ce", "grad_norm", "skipped", "warning", "param_sq", "momentum_sq", "spike_loss",
                    "spike_limit"):
            if key in m:
                rec[key] = m[key]
        if "loss" in m:
            self._recent_losses.append(m["loss"])
            rec["loss_avg"] = sum(self._recent_losses) / len(self._recent_losses)
            rec["loss_n"] = len(self._recent_losses)
        if env.device.type == "cuda":
            rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.console.update(step, rec)
        if step % cfg.tracking.log_every_steps == 0 or m.get("skipped") or step == sched.stop_step:
            self.metrics.write(rec)
            self.tracker.log_metrics({k: v for k, v in rec.items() if isinstance(v, (int, float))
                                      and k not in ("step", "total_steps")}, step)

    def record(self, row: dict) -> None:
        """One row of metrics.jsonl that needs no plot or MLflow metric (checkpoint, straggler)."""
        self.metrics.write(row)

    def validation(self, step: int, epoch: int, result: dict, seconds: float, class_names: list[str]) -> None:
        """A full validation's ``result`` (train.validate.Validator.full): its row, MLflow metrics and plots."""
        if not self.is_main:
            return
        self.metrics.write({"kind": "val", "step": step, "epoch": epoch, "mean_dice": result["mean_dice"],
                            "val_seconds": seconds, "per_class": result["per_class"],
                            **{k: result[k] for k in SURFACE_KEYS if k in result}})
        # HD95 / NSD means when validation.surface_metrics is on (NaN ones are not sent)
        self.tracker.log_metrics({"val_mean_dice": result["mean_dice"],
                                  **{f"val_{k}": result[k] for k in ("mean_hd95", "mean_nsd") if k in result}}, step)
        plots = self.run_dir / "plots"
        dice_png = plot_class_dice(result["per_class"], plots / "val_dice.png",
                                   f"validation Dice per class, step {step} (mean {result['mean_dice']:.3f})")
        paths = [dice_png, plot_progress(self.metrics.history, plots / "progress.png")]
        if "preview" in result:
            case_id, image, label, pred = result["preview"]
            paths.append(plot_preview(image, label, pred, plots / f"val_preview_step{step:09d}.png",
                                      f"{case_id}, step {step}", class_names))
        for p in paths:
            if p is not None:
                self.tracker.log_artifact(p, "plots")
        log.info("validation at step %d: mean foreground Dice %.4f over %d case(s)", step, result["mean_dice"],
                 result["cases"])

    def pseudo_dice(self, step: int, epoch: int, mean_dice: float) -> None:
        if not self.is_main:
            return
        self.metrics.write({"kind": "pseudo_dice", "step": step, "epoch": epoch, "mean_dice": mean_dice})
        self.tracker.log_metrics({"pseudo_dice": mean_dice}, step)
        # no plot here: progress.png is redrawn at full validations and at the end, not every
        # epoch while the other ranks wait at the next collective

    def validated_at(self, step: int) -> bool:
        """A full validation at ``step`` is in metrics.jsonl (rank 0 only keeps the history: False elsewhere)."""
        return any(r.get("kind") == "val" and r.get("step") == step for r in self.metrics.history)

    def rollback(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "rollbacks.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.metrics.write({"kind": "rollback", **record})

    # ---- end ------------------------------------------------------------------------------------

    def preempted(self, step: int, signal_name: str) -> None:
        """REQUEUE tells launchers that cannot see the exit code (and the next job) where the run stopped."""
        if self.is_main:
            (self.run_dir / "REQUEUE").write_text(json.dumps({"step": step, "signal": signal_name, "time": time.time()}))
            self.metrics.write({"kind": "preempted", "step": step, "signal": signal_name})

    def finished(self, status: str) -> None:
        """The run ends as FINISHED, FAILED or KILLED: the last progress plot, then the MLflow run is ended."""
        if self.console is not None:
            self.console.close()
        if self.is_main:
            plot = plot_progress(self.metrics.history, self.run_dir / "plots" / "progress.png")
            if plot is not None:
                self.tracker.log_artifact(plot, "plots")
            if status == "FINISHED":
                (self.run_dir / "REQUEUE").unlink(missing_ok=True)
        self.tracker.close(status)


def launch_command(argv: list[str] | None, launcher: str = "single") -> str:
    """The command as launched, e.g. 'torchrun --nproc_per_node=8 --nnodes=1 -m stunet_scale.train --config ...'.

    ``launcher`` is DistEnv.launcher (single | torchrun | accelerate | slurm).
    """
    args = sys.argv if argv is None else argv
    given = os.environ.get("STUNET_LAUNCH_COMMAND")  # set by slurm/launch scripts that know better
    if given:
        return given
    prefix = []
    if launcher == "accelerate":
        prefix = ["accelerate", "launch"]
    elif launcher == "torchrun":
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
        prefix = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}",
                  f"--nnodes={int(os.environ.get('WORLD_SIZE', '1')) // local}"]
    elif launcher == "slurm":
        prefix = ["srun"]
    return " ".join(shlex.quote(a) for a in prefix + list(args))
