"""The trainer: build everything from one config, then an explicit loop.

Reading order: ``Trainer.train()`` (the loop, one screen), ``_after_step()`` (the decisions after
a step: rollback, validate, save, stop), ``train_step()`` (forward/backward/step with the collective
non-finite check), then the helpers they call: ``_save``, ``_rollback``, ``_validate``, ``_log``.
Everything distributed lives behind ``self.backend`` (stunet_scale.parallel) and ``self.env`` (rank,
world size, tiny collectives); everything the run writes about itself (run files, metrics.jsonl,
plots, MLflow, console) behind ``self.report`` (run_report.py): the Trainer decides, the report records.

Step semantics: ``state.step`` counts optimizer steps *attempted*; it is the position in the
sample plan (sample index = step * global_batch + position), so a skipped step still consumes its
samples and a resume at any world size continues with the next global sample. A rollback
(``_rollback``) restores an earlier checkpoint's weights but keeps the step: the sample range
between the two is skipped, not replayed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import torch

from .. import config as config_mod
from ..checkpointing.commit import (
    CheckpointError,
    NoValidCheckpoint,
    list_checkpoints,
    resolve_newest_valid,
    step_dirname,
    verify,
)
from ..checkpointing.manager import CheckpointManager, ResumePlan
from ..checkpointing.portable import state_norms
from ..checkpointing.state import STATE_FILE, TrainerState, check_same_plan, restore_rng, seed_everything
from ..config import StreamConfig, TrainConfig, world_batch_arithmetic
from ..data.stream.loader import StoreDataSource
from ..data.stream.source import DataSource, DataSourceFactory
from ..faults import Faults
from ..models import build_stunet
from ..parallel.distributed import (
    EXIT_HANG,
    StepWatchdog,
    check_cudnn_conv3d,
    dump_all_stacks,
    hang_dump_path,
    init_distributed,
    is_collective_timeout,
    shutdown,
)
from ..parallel.wrap import build_backend
from ..tracking import end_open_runs
from .exit_codes import EXIT_DIVERGED, EXIT_OK, EXIT_REQUEUE
from .loss import DiceCELoss
from .preflight import disk_full_message, is_disk_full
from .run_lease import hold_run_lease, release_held
from .run_report import RunReport
from .schedule import Schedule, resume_step
from .stragglers import StragglerWatch
from .validate import Validator

log = logging.getLogger("stunet_scale.train")

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class Diverged(RuntimeError):
    """Non-finite losses that a rollback did not cure; the run must stop (EXIT_DIVERGED)."""


class DiskFull(RuntimeError):
    """A checkpoint save ran out of disk; the message names the path and the bytes needed (EXIT_DISK_FULL)."""


class Trainer:
    def __init__(self, cfg: TrainConfig, data: DataSourceFactory | None = None, argv: list[str] | None = None):
        self.cfg = cfg
        self.schedule = Schedule.from_config(cfg)
        # the data enters here, as an object with a typed interface (data/stream/source.py); tests pass stand-ins
        self.data: DataSource = (data or StoreDataSource)(StreamConfig.of(cfg))
        self.env = init_distributed(cfg.distributed.timeout_s, cfg.run_dir,
                                    need_group=cfg.distributed.backend in ("deepspeed", "fsdp2"))
        env = self.env
        self.run_dir = Path(env.broadcast_object(str(Path(cfg.run_dir).resolve())))
        # One job per run dir, decided before anything below writes to it (run files, checkpoint
        # clean-up, MLflow): a second job gets LeaseHeld (exit 2) on every rank. Released in run().
        hold_run_lease(self.run_dir, cfg.lease, env)
        self.grad_accumulation = world_batch_arithmetic(cfg, env.world_size)["grad_accumulation"]
        self.faults = Faults.from_env(env.rank)
        self.report = RunReport(cfg, env, self.run_dir, self.schedule)  # what the run writes about itself
        self._preempt_signal: int | None = None
        self._last_full_val: int | None = None
        self._t_start = time.time()
        self.git_revision = self.report.launched(argv)  # run files written; the revision also goes into checkpoints
        self._configure_torch()

        # ---- resume or start: decide before building anything ----
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint, env, self.faults.save_hook)
        self.ckpt.prepare()
        resume_path = self.ckpt.find_resume(cfg.checkpoint.resume)
        plan = self._plan(resume_path) if resume_path else None

        # ---- model: same seed on every rank -> identical init; checkpoint weights after wrapping ----
        torch.manual_seed(cfg.seed)
        model = build_stunet(cfg.model)
        if plan is None and cfg.checkpoint.init_from:
            self._init_from_pretrained(model, cfg.checkpoint.init_from)
        self.backend = build_backend(model, cfg, env, self.grad_accumulation)
        self.state = TrainerState(seed=cfg.seed, global_batch=cfg.schedule.global_batch)
        if plan is not None:
            self._restore(plan)
        else:
            seed_everything(cfg.seed, env.rank)
        self.state.world_size, self.state.backend = env.world_size, cfg.distributed.backend
        self.state.zero_stage = self._zero_stage()
        self.state.global_batch = cfg.schedule.global_batch
        self.state.git_revision = self.git_revision

        self.loss_fn = DiceCELoss.from_config(cfg.loss)
        run_name = cfg.tracking.run_name or self.run_dir.name
        run_id = self.report.start_tracking(self.state.mlflow_run_id, run_name, self.git_revision)
        self.state.mlflow_run_id, self.state.run_name = env.broadcast_object(run_id), run_name
        self.validator = Validator(cfg, self.backend, env, self.data, self.run_dir, class_names(cfg))
        self._install_signal_handlers()
        # armed only while a step (data included) runs: see StepWatchdog; paused for saves and validation
        self.watchdog = StepWatchdog(cfg.distributed.timeout_s, self.run_dir, env.rank,
                                     on_hang=lambda reason: end_open_runs("FAILED", f"hang: {reason}"))
        self.stragglers = StragglerWatch(cfg.tracking, env, self.report.record)  # collective: gathers the hosts
        log.info("%s on %d rank(s) (%s), grad accumulation %d, %s, step %d/%d",
                 cfg.distributed.backend, env.world_size, env.launcher, self.grad_accumulation,
                 cfg.distributed.precision, self.state.step, self.schedule.stop_step)

    # ============================================================================================
    # the loop
    # ============================================================================================

    def train(self) -> int:
        cfg, env, sched = self.cfg, self.env, self.schedule
        stop = sched.stop_step
        self.report.open_console(self.state.step)
        if self.state.step >= stop:
            # The final checkpoint exists, but what follows it may not have run: a job killed during
            # its final validation, or preempted at its last step by an older version, is requeued
            # into this branch. Finishing here is idempotent for a run that did complete.
            log.info("nothing to train: the run is at step %d of %d", self.state.step, stop)
            self._final_validation()
            self.report.finished("FINISHED")
            return EXIT_OK
        self._last_saved = self.state.step
        try:
            while self.state.step < stop:  # re-entered only after a rollback
                stream = self.data.train_stream(rank=env.rank, world_size=env.world_size, start_step=self.state.step,
                                                device=self.backend.device)
                try:
                    self._check_plan(stream)
                    self.watchdog.kick()
                    t_data = time.perf_counter()
                    for step, micro_batches in stream:
                        data_wait = time.perf_counter() - t_data
                        self._t_ready = self._t_first_collective = time.perf_counter()
                        self.faults.before_step(step)
                        self.backend.set_lr(sched.lr(step))
                        m = self.train_step(step, micro_batches)
                        self.state.step, self.state.samples_seen = step + 1, sched.samples_seen(step + 1)
                        self.state.stream = stream.state_dict()
                        m.update(step=step + 1, data_wait=data_wait, step_time=time.perf_counter() - t_data,
                                 local_compute=self._t_first_collective - self._t_ready)
                        outcome = self._after_step(m)
                        if outcome == "preempted":
                            return self._preempted()
                        if outcome is not None:  # "rollback" or "done"
                            break
                        self.watchdog.kick()
                        t_data = time.perf_counter()
                finally:
                    self.watchdog.pause()
                    stream.close()
                if self.state.consecutive_skips >= cfg.checkpoint.rollback_after_skips:
                    self._rollback()
                    if self.state.step >= stop:
                        # the bad range ran to the end: save, or a rerun would resume at the target and train it again
                        self._save()
                    self._last_saved = self.state.step
            self._final_validation()
            self.report.finished("FINISHED")
            return EXIT_OK
        except Diverged as e:
            if env.is_main:
                log.error("%s", e)
            self.report.finished("FAILED")
            return EXIT_DIVERGED

    def _after_step(self, m: dict) -> str | None:
        """Counters, logs, validation, checkpoint and the stop decisions after one step (the same on every rank).

        Returns None to go on, "rollback" (K consecutive skipped steps), "done" (the last step,
        saved) or "preempted" (a signal on some rank; the checkpoint of this step is committed).
        """
        env, step = self.env, self.state.step
        preempt = m.pop("preempt", None)  # agreed on in the step's metrics reduction
        rollback = self._account(m)
        self._log(m)
        self.stragglers.step(m)
        if rollback:
            return "rollback"
        validated = self._epoch_end(step)
        if validated:
            self.watchdog.pause()
            self._validate(step)
        if preempt is None or validated:  # a skipped step had no reduction; a signal may come during validation
            preempt = env.any(self._preempt_signal is not None)  # one rank's signal stops all
        done = step >= self.schedule.stop_step
        if preempt or done or step % self.cfg.checkpoint.every_steps == 0:
            if step != self._last_saved:
                self.watchdog.pause()
                self._save()
                self._last_saved = step
            # a signal that arrived during the save is honoured now: no extra step, no second save
            preempt = preempt or env.any(self._preempt_signal is not None)
        # The last step's checkpoint is saved either way; a requeue would find nothing to train,
        # so finish (final validation, tracking run closed) instead.
        if preempt and not done:
            return "preempted"
        return "done" if done else None

    def train_step(self, step: int, micro_batches: list[dict]) -> dict:
        """Forward/backward over the micro-batches of one global batch, then one optimizer step.

        A non-finite loss on any rank and any micro-batch skips the whole step on every rank
        before its backward: the partial gradient is discarded, parameters and optimizer state
        are untouched. So does a loss spike: a micro-batch whose global loss (the mean over ranks)
        exceeds checkpoint.spike_factor x the median of the last spike_window accepted steps'
        losses. Both are decided by one all-reduce per micro-batch of [non-finite flag, loss], so
        every rank sees the same sum and makes the same decision.
        """
        n = len(micro_batches)
        spike_limit = self._spike_limit()  # None: detector off or still warming up
        sums = None  # loss, dice, ce summed over micro-batches, kept on the device: read once per step
        for i, mb in enumerate(micro_batches):
            with self.backend.accumulate(last=i == n - 1):
                outputs = self.backend.forward(mb["image"])
                # annotated: [m, C] host bool (classes unannotated in a sample's case are marginalised)
                loss, terms = self.loss_fn(outputs, mb["targets"], mb.get("annotated"))  # fp32, autocast off inside
                if self.faults.nan_loss(step):
                    loss = loss * float("nan")
                if (factor := self.faults.loss_factor(step)) != 1.0:
                    loss = loss * factor
                # Decided before this micro-batch's backward: DeepSpeed and DDP reduce gradients
                # inside backward, so a bad loss must stop every rank before any of them does.
                local_bad = ~torch.isfinite(loss.detach())
                if i == 0:  # this rank's own work ends here; after it, time may be waiting for peers
                    self._t_first_collective = time.perf_counter()
                any_bad, global_loss = self._reduce_loss_check(loss, local_bad)
                if any_bad:
                    self.backend.discard_grads()
                    if bool(local_bad):
                        idx = mb.get("sample_index")
                        log.warning("rank %d: non-finite loss at step %d, sample indices %s", self.env.rank, step + 1,
                                    None if idx is None else idx.tolist())
                    return {"skipped": "nonfinite_loss"}
                if spike_limit is not None and global_loss > spike_limit:
                    self.backend.discard_grads()
                    idx = mb.get("sample_index")
                    log.warning("rank %d: loss spike at step %d: global loss %.4g > %.4g (%.1f x the median of %d accepted "
                                "steps), this rank's loss %.4g, sample indices %s", self.env.rank, step + 1, global_loss,
                                spike_limit, self.cfg.checkpoint.spike_factor, len(self.state.loss_window),
                                float(loss.detach()), None if idx is None else idx.tolist())
                    return {"skipped": "loss_spike", "spike_loss": global_loss, "spike_limit": spike_limit}
                self.backend.backward(loss)
            terms_now = torch.stack([loss.detach(), terms["dice"].detach(), terms["ce"].detach()]).double()
            sums = terms_now if sums is None else sums + terms_now
        grad_norm, reason = self.backend.step()
        # One reduction for the step's metrics and the preemption flag (a sum > 0: some rank got a signal).
        totals = self.env.all_reduce((sums / n).tolist() + [float(self._preempt_signal is not None)], "sum")
        loss, dice, ce = (v / self.env.world_size for v in totals[:3])
        out = {"loss": loss, "dice": dice, "ce": ce, "grad_norm": grad_norm, "preempt": totals[3] > 0}
        if reason in ("nonfinite_grad", "loss_scale"):
            out["skipped"] = reason
        elif reason:
            out["warning"] = reason
        return out

    def _reduce_loss_check(self, loss: torch.Tensor, local_bad: torch.Tensor) -> tuple[bool, float]:
        """(any rank non-finite, global loss = mean over ranks) from ONE all-reduce (sum) of [flag, loss].

        The pre-backward collective the non-finite check always needed, widened by one element so
        the spike check costs no extra collective. A non-finite loss enters the sum as 0 (the flag
        already decides the step); values stay on the device until the one read of the result.
        """
        env = self.env
        value = torch.where(local_bad, torch.zeros_like(loss.detach()), loss.detach())
        t = torch.stack([local_bad.float(), value.float()]).reshape(2).to(env.collective_device, torch.float64)
        if env.initialized:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        flags, total = t.tolist()
        return flags > 0, total / env.world_size

    def _spike_limit(self) -> float | None:
        """The loss above which a step is a spike, or None (detector off, or fewer than spike_window accepted steps).

        Relative to a running median, not the first losses: DiceCE (CE + 1 - soft Dice, >= 0)
        starts near 1-2 and falls several-fold over a run, and a median ignores the odd hard batch.
        """
        c = self.cfg.checkpoint
        window = self.state.loss_window
        if c.spike_factor <= 0 or len(window) < c.spike_window:
            return None
        return c.spike_factor * statistics.median(window[-c.spike_window:])

    # ============================================================================================
    # bookkeeping around the step
    # ============================================================================================

    def _account(self, m: dict) -> bool:
        """Update counters and the spike window; True when K consecutive skipped steps call for a rollback."""
        skipped = m.get("skipped")
        if skipped in ("nonfinite_loss", "nonfinite_grad", "loss_spike"):
            if skipped == "loss_spike":
                self.state.skipped_spikes += 1
            else:
                self.state.skipped_nonfinite += 1
            self.state.consecutive_skips += 1
            if self.env.is_main:
                log.warning("step %d skipped (%s) on all ranks; %d consecutive, %d non-finite and %d spike(s) in total",
                            m["step"], skipped, self.state.consecutive_skips, self.state.skipped_nonfinite,
                            self.state.skipped_spikes)
            return self.state.consecutive_skips >= self.cfg.checkpoint.rollback_after_skips
        if skipped is None:
            self.state.optimizer_steps += 1
            # the global step loss (already reduced over ranks in train_step): identical on every rank
            window = self.state.loss_window
            window.append(float(m["loss"]))
            del window[:-self.cfg.checkpoint.spike_window]
        self.state.consecutive_skips = 0
        return False

    def _rollback(self) -> None:
        """Reload the last good checkpoint and skip the bad sample range; a second rollback to it is fatal.

        The target is the newest valid checkpoint saved outside a skip streak (its state's
        consecutive_skips == 0): one saved between skipped steps already holds the trouble. After
        its weights, optimizer and RNG are loaded, the run continues at ``bad_step`` (the step
        after the last skipped one), not at the target's step: the global samples
        [target_step * global_batch, bad_step * global_batch) are skipped, so the data that
        diverged is not replayed. Consistency of the counters after that jump:

        - ``state.step`` = ``bad_step``: the position in the sample plan; the next stream starts there.
        - ``state.samples_seen`` = ``bad_step * global_batch``: samples *consumed* from the plan
          (trained on or skipped), as a resume at another world size needs it.
        - The LR schedule is a function of the step, so it continues at ``lr(bad_step)``;
          ``stop_step`` is unchanged: the run ends where it would have, with fewer applied
          updates (``optimizer_steps`` is the target's count and keeps counting applied steps).
        - The spike window is the target's (the losses that went with those weights); the skip
          counters and the rollback history are this run's, not the target's.

        A second rollback to the same checkpoint means skipping data did not help (the model or
        the learning rate diverges): ``Diverged`` (exit 3).
        """
        bad_step = self.state.step
        target = self._rollback_target()
        if target is None:
            raise Diverged(f"{self.state.consecutive_skips} consecutive skipped steps up to step {bad_step} and "
                           "no checkpoint to roll back to; lower optim.lr or check the data")
        target_state = TrainerState.from_file(target / STATE_FILE)
        history = list(self.state.rollbacks)
        if any(r["to_step"] == target_state.step for r in history):
            raise Diverged(
                f"skipped steps again after rolling back to step {target_state.step} (now at step {bad_step}): "
                f"the second rollback to the same checkpoint; stopping. Rollbacks so far: {history}. "
                "Lower optim.lr, check the samples logged above, or resume from an earlier checkpoint"
            )
        batch = self.cfg.schedule.global_batch
        skipped_samples = [target_state.step * batch, bad_step * batch]
        record = {"from_step": bad_step, "to_step": target_state.step, "resume_step": bad_step,
                  "skipped_samples": skipped_samples, "time": time.time()}
        if self.env.is_main:
            log.error("%d consecutive skipped steps at step %d: rolling back to %s and skipping global samples "
                      "[%d, %d) (steps %d-%d); training continues at step %d", self.state.consecutive_skips, bad_step,
                      target, skipped_samples[0], skipped_samples[1], target_state.step + 1, bad_step, bad_step + 1)
        plan = self._plan(target)
        keep = (self.state.skipped_nonfinite, self.state.skipped_spikes, self.state.mlflow_run_id)
        self._restore(plan)
        self.state.skipped_nonfinite, self.state.skipped_spikes, self.state.mlflow_run_id = keep
        self.state.step, self.state.samples_seen = bad_step, self.schedule.samples_seen(bad_step)
        self.state.rollbacks = history + [record]
        self.report.rollback(record)

    def _rollback_target(self) -> Path | None:
        """Newest valid checkpoint whose state was saved outside a skip streak; else the newest valid one.

        Every rank walks the same list on the shared filesystem, so they agree (verify() may hash
        collectively). The fallback keeps today's behaviour when retention pruned every good one.
        """
        for _, path in list_checkpoints(self.ckpt.root):
            ok, _reason = verify(path, self.env)
            if ok and TrainerState.from_file(path / STATE_FILE).consecutive_skips == 0:
                return path
        return resolve_newest_valid(self.ckpt.root, self.env)

    def _check_plan(self, stream) -> None:
        """Stop (exit 2) when a resumed run's sample plan is not the checkpoint's; record it for the next save."""
        current = getattr(stream, "fingerprint", None)  # test stand-in streams have no plan
        if current is None:
            return
        if self.state.step > 0 and self.state.plan_fingerprint is None and self.env.is_main:
            log.warning("the checkpoint resumed from predates stored sample-plan fingerprints: the plan cannot be "
                        "compared (seed %d was); from the next save on it is (%s)", self.state.seed, current)
        where = self.run_dir / "checkpoints"
        # the seed was compared in _restore; only the plan is new here
        for warning in check_same_plan(self.state, where, seed=self.state.seed, fingerprint=current,
                                       allow_change=self.cfg.checkpoint.allow_plan_change):
            if self.env.is_main:
                log.warning("%s", warning)
        self.state.plan_fingerprint = current
        self.state.seed = self.cfg.seed

    def _zero_stage(self) -> int | None:
        return self.cfg.distributed.zero_stage if self.cfg.distributed.backend == "deepspeed" else None

    def _plan(self, path: Path) -> ResumePlan:
        return self.ckpt.plan(path, self.cfg.distributed.backend, self._zero_stage())

    def _restore(self, plan: ResumePlan) -> None:
        """Load a checkpoint into the built backend: at start (resume) and on a rollback alike."""
        env = self.env
        if plan.mode == "native":
            self.backend.load_native(str(plan.path / "native"))
        else:
            # Through the backend, not module.load_state_dict: sharded parameters and ZeRO's fp32
            # master copy must be written too, or the next step undoes the load.
            reader = plan.reader()
            try:
                model_names = [n for n, _ in self.backend.module.named_parameters()]
                missing = sorted(set(model_names) - set(reader.names()))
                if missing:
                    raise CheckpointError(f"{plan.path}: no saved values for {len(missing)} parameter(s) of this "
                                          f"model, e.g. {missing[:3]}; the checkpoint is of another model.* configuration")
                self.backend.load_params(reader.param)
                self.backend.load_momentum(reader.momentum)
            finally:
                reader.close()
        saved = plan.state
        # The seed is known now; the plan fingerprint once the stream is built (_check_plan).
        for warning in check_same_plan(saved, plan.path, seed=self.cfg.seed, fingerprint=None,
                                       allow_change=self.cfg.checkpoint.allow_plan_change):
            log.warning("%s", warning)
        same_topology = saved.world_size == env.world_size and saved.backend == self.cfg.distributed.backend
        if same_topology:
            self.backend.load_extra_state(saved.backend_extra)
        rng = self.ckpt.load_rng(plan.path) if same_topology else None
        if rng is not None:
            restore_rng(rng)
        else:
            seed_everything(self.cfg.seed + saved.step, env.rank)
            log.warning("resuming %s (%s): RNG states re-derived per rank, so the run is not bit-exact "
                        "with an uninterrupted one (the sample plan still continues exactly)", plan.path.name, plan.reason)
        step = resume_step(saved.samples_seen, self.cfg.schedule.global_batch)
        self.state = saved
        self.state.step = step
        self.state.consecutive_skips = 0
        norms = state_norms(self.backend, env) if os.environ.get("STUNET_LOG_RESUME_NORMS") else {}
        self.report.resumed(plan, step, norms)

    def _save(self) -> None:
        self.state.elapsed_s += time.time() - self._t_start
        self._t_start = time.time()
        self.state.backend_extra = self.backend.extra_state()
        try:
            path, norms = self.ckpt.save(self.state.step, self.backend, self.state, self.cfg)
        except Exception as e:
            if not is_disk_full(e):
                raise
            # Remove the half-written step so the disk holds what it held before and the previous
            # checkpoint stays the resume point; the message names the path and the bytes needed.
            tmp = self.ckpt.root / (step_dirname(self.state.step) + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFull(disk_full_message(tmp, self.cfg)) from e
        self.report.record({"kind": "checkpoint", "step": self.state.step, "path": str(path), "norms": norms})

    def _epoch_end(self, steps_done: int) -> bool:
        return self.cfg.validation.enabled and self.validator.available and self.schedule.epoch_boundary(steps_done)

    def _validate(self, step: int, full: bool = False) -> None:
        v = self.cfg.validation
        epoch = int(self.schedule.epoch(step))
        if full or self.schedule.epoch_boundary(step, v.every_epochs):
            self._last_full_val = step
            t0 = time.time()
            result = self.validator.full(step)
            self.report.validation(step, epoch, result, time.time() - t0, self.validator.class_names)
        elif v.pseudo_dice_batches > 0:
            self.report.pseudo_dice(step, epoch, self.validator.pseudo_dice(epoch)["mean_dice"])

    def _final_validation(self) -> None:
        """Full validation at the final step unless it ran, here or (per metrics.jsonl) in an earlier process."""
        step = self.state.step
        if not (self.cfg.validation.enabled and self.validator.available) or self._last_full_val == step:
            return
        # only rank 0 keeps the metrics history; any() makes its answer everyone's
        ran_before = self.env.any(self.report.validated_at(step))
        if not ran_before:
            self._validate(step, full=True)

    def _log(self, m: dict) -> None:
        if os.environ.get("STUNET_LOG_PARAM_NORMS"):  # tests: show that skipped steps change nothing (collective)
            m.update(state_norms(self.backend, self.env))
        self.report.train_step(m, self.state)

    def _preempted(self) -> int:
        name = signal.Signals(self._preempt_signal).name if self._preempt_signal else "a peer's signal"
        log.warning("preemption (%s): checkpoint at step %d is committed; exiting with %d so the job is requeued",
                    name, self.state.step, EXIT_REQUEUE)
        self.report.preempted(self.state.step, name)
        self.report.finished("KILLED")
        return EXIT_REQUEUE

    def close(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)
        self.backend.close()
        if hasattr(self, "watchdog"):
            self.watchdog.close()
        shutdown(self.env)

    # ============================================================================================
    # setup helpers
    # ============================================================================================

    def _configure_torch(self) -> None:
        d = self.cfg.distributed
        if self.env.device.type == "cuda":
            torch.backends.cudnn.benchmark = not d.deterministic  # fixed patch size: autotune once
            torch.backends.cudnn.deterministic = d.deterministic
            if d.cudnn_check != "off":
                try:
                    log.info("%s", check_cudnn_conv3d(self.env.device, torch.bfloat16 if d.precision == "bf16" else torch.float16))
                except RuntimeError as e:
                    if d.cudnn_check == "error":
                        raise
                    log.warning("%s", e)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        main_pid = os.getpid()

        def handler(signum, frame):  # only a flag: no I/O, no collectives inside a handler
            if os.getpid() == main_pid:  # forked data workers inherit this; they ignore it
                self._preempt_signal = signum

        self._old_handlers = {}
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name)
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _init_from_pretrained(self, model, path: str) -> None:
        try:
            from ..export import initialize_from_pretrained
        except ImportError as e:
            raise RuntimeError(f"checkpoint.init_from needs stunet_scale.export.initialize_from_pretrained ({e})") from e
        from ..export.checkpoint_io import CheckpointError as WeightsError

        try:
            report = initialize_from_pretrained(model, path)
        except (WeightsError, OSError, ValueError) as e:  # refused, unreadable or mismatched: the config names it
            raise config_mod.ConfigError(f"checkpoint.init_from={path!r}: {e}") from None
        self.report.initialized_from(path, report)


def class_names(cfg) -> list[str]:
    """Label names for validation and previews: the prepared store's own list (any class map, also a
    dataset.json's), else the named class map's, else class_1..."""
    manifest = Path(cfg.data.root) / "manifest.json"
    try:
        labels = list(json.loads(manifest.read_text())["class_map"]["labels"])
    except (OSError, ValueError, KeyError, TypeError):  # stand-in data in tests; the loader checks real stores
        labels = []
    if len(labels) != cfg.model.num_classes:
        from ..data.class_maps import CLASS_MAP_FILES, load_class_map

        labels = list(load_class_map(cfg.data.class_map).labels) if cfg.data.class_map in CLASS_MAP_FILES else []
    if len(labels) == cfg.model.num_classes:
        return labels
    return ["background"] + [f"class_{i}" for i in range(1, cfg.model.num_classes)]


_KEEP_UNTIL_EXIT: list = []  # multi-rank trainers, never freed (see run()'s finally)


def run(cfg: TrainConfig, data=None, argv: list[str] | None = None) -> int:
    """Build, train, clean up; returns the process exit code (see stunet_scale.train). The caller has
    run ``preflight.validate(cfg)`` (``train/__main__.py`` does, on every rank).

    Every way out after MLflow started ends its run as FINISHED, FAILED or KILLED with the reason
    (tracking.end_open_runs), so no failure leaves a run RUNNING in the UI.
    """
    from .exit_codes import EXIT_DISK_FULL, EXIT_NO_VALID_CHECKPOINT

    # train/__main__.py has run preflight.validate(cfg) on this rank already (ConfigError -> exit 2
    # before any group, backend or MLflow run); run() starts from a checked config.
    trainer = None
    try:
        trainer = Trainer(cfg, data=data, argv=argv)
        return trainer.train()
    except (NoValidCheckpoint, CheckpointError) as e:
        log.error("%s", e)
        end_open_runs("FAILED", f"no valid checkpoint: {e}")
        return EXIT_NO_VALID_CHECKPOINT
    except DiskFull as e:
        log.error("%s", e)
        end_open_runs("FAILED", str(e))
        return EXIT_DISK_FULL
    except config_mod.ConfigError as e:
        end_open_runs("FAILED", f"config error: {e}")
        raise
    except KeyboardInterrupt:
        end_open_runs("KILLED", "interrupted (SIGINT)")
        raise
    except RuntimeError as e:
        if trainer is None or not is_collective_timeout(e):
            end_open_runs("FAILED", f"{e.__class__.__name__}: {e}")
            raise
        # a peer hung (or died) and this rank's collective gave up after distributed.timeout_s
        path = hang_dump_path(trainer.run_dir, trainer.env.rank)
        dump_all_stacks(path, f"rank {trainer.env.rank}: collective timed out: {e}")
        log.error("rank %d: a collective timed out after distributed.timeout_s=%ss (a peer hangs or died): %s; stacks in %s; "
                  "exiting with %d", trainer.env.rank, cfg.distributed.timeout_s, str(e).splitlines()[0], path, EXIT_HANG)
        end_open_runs("FAILED", f"hang: collective timeout: {e}")
        return EXIT_HANG
    except BaseException as e:
        end_open_runs("FAILED", f"{e.__class__.__name__}: {e}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
            if trainer.env.world_size > 1:
                # Freeing the trainer frees DDP's reducer, which holds the last reference to the gloo
                # process group; its destructor joins gloo's thread while holding the GIL, and that
                # thread may be waiting for the GIL to drop a tensor: a deadlock (seen on rank 1, stuck
                # in ~ProcessGroupGloo <- ~Reducer as run() returned). exit_rank_process() ends a
                # multi-rank process without freeing anything, so keep the trainer until then.
                _KEEP_UNTIL_EXIT.append(trainer)
        release_held()  # after close(): nothing of this job writes to the run dir any more
