"""``train --dry-run``: the ranks' own ``validate()`` in this one process, then a summary of the run.

    stunet-scale train --config configs/pretrain/totalseg_stunet_h.yaml --dry-run --world-size 64 schedule.global_batch=128

The verdict is ``train/preflight.py::validate``'s, the function every rank calls before it starts,
run here for ``--world-size`` ranks: a config the dry run passes is one the ranks accept. What
follows is advice for the run at that size (accumulation, ZeRO on few ranks, shards per reader,
checkpoint cadence) and, when the caller supplies one, the capacity planner's memory and time
prediction (``stunet-scale train --dry-run`` does, from ``stunet_scale/planning.py``; the trainer
package does not import the planner).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import ConfigError, TrainConfig
from .preflight import Validated, validate

# (cfg, world_size, grad_accumulation) -> [(level, text)], level "ok" | "warn" | "error"
MemoryCheck = Callable[[TrainConfig, int, int], list[tuple[str, str]]]


@dataclass
class DryRunReport:
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ok(self, text: str) -> None:
        self.lines.append(f"  ok    {text}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.lines.append(f"  WARN  {text}")

    def error(self, text: str) -> None:
        self.errors.append(text)
        self.lines.append(f"  FAIL  {text}")

    def add(self, level: str, text: str) -> None:
        {"ok": self.ok, "warn": self.warn, "error": self.error}[level](text)


def dry_run(cfg: TrainConfig, world_size: int | None = None, out: Callable[[str], None] = print,
            memory_check: MemoryCheck | None = None) -> int:
    """Validate a W-rank run in this one process; print a report; 0 = go, 2 = fix the config first.

    ``world_size`` None = ``$WORLD_SIZE`` (1 when unset). ``memory_check``: the planner's prediction
    for this configuration (``planning.dry_run_memory_check``), or None to leave it out.
    """
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dist = cfg.distributed
    out(f"dry run: {world} rank(s), backend {dist.backend}"
        + (f" ZeRO-{dist.zero_stage}" if dist.backend == "deepspeed" else "")
        + f", model {cfg.model.size or 'custom'}, run_dir {cfg.run_dir}")
    r = DryRunReport()
    try:
        checked = validate(cfg, world)
    except ConfigError as e:
        r.error(str(e))
        return _finish(r, out)
    r.ok("config, world size, prepared store, checkpoint.init_from and disk space (the ranks' own validate())")
    _summarise(cfg, checked, r)
    if memory_check is None:
        r.ok("memory/time not estimated here; `stunet-scale train --dry-run` adds the capacity planner's prediction")
    else:
        for level, text in memory_check(cfg, world, checked.arithmetic["grad_accumulation"]):
            r.add(level, text)
    return _finish(r, out)


def _summarise(cfg: TrainConfig, checked: Validated, r: DryRunReport) -> None:
    dist, s, a, world = cfg.distributed, cfg.schedule, checked.arithmetic, checked.world_size
    # The sample budget is fixed; steps follow the global batch.
    r.ok(f"batch: global {s.global_batch} = micro {s.micro_batch} x {world} ranks x accumulation "
         f"{a['grad_accumulation']}; {a['total_samples']:,} samples = {a['total_steps']:,} optimizer steps "
         f"({a['steps_per_epoch']} per epoch)")
    if world == 1 and dist.backend == "deepspeed" and dist.zero_stage >= 1 and not (dist.offload_optimizer or dist.offload_params):
        r.warn(f"ZeRO-{dist.zero_stage} on 1 rank shards nothing; distributed.backend=none or zero_stage=0 is simpler")
    else:
        r.ok(f"backend {dist.backend} on {world} rank(s)")
    if dist.backend == "deepspeed" and dist.zero_stage == 3 and (cfg.model.size or "").upper() in ("S", "B"):
        r.warn("ZeRO-3 on STU-Net-S/B: per-module gathers cost time and save little (model states 0.2 / 0.9 GB); DDP fits")

    store = checked.store
    if store is not None:
        r.ok(f"{checked.train_cases} training cases in {store.root} for data.train_splits={cfg.data.train_splits}")
        if cfg.data.format == "wds":
            # Every rank's workers read shards; with fewer shards than readers some share one.
            from ..data.stream.webdataset_reader import train_shards

            shards = len(train_shards(store, cfg.data.train_splits))
            streams = world * max(cfg.data.num_workers, 1)
            if shards < streams:
                r.error(f"{shards} WebDataset shards for {world} ranks x {max(cfg.data.num_workers, 1)} workers = "
                        f"{streams} readers: some readers would share a shard; lower data.num_workers, use "
                        f"data.format=zarr, or prepare with more, smaller shards")
            else:
                r.ok(f"{shards} WebDataset shards for {streams} readers ({shards / streams:.1f} each)")

    # Where the trainer stops: the schedule's own rule (schedule.max_steps only if it is earlier
    # than the recipe's end), not a copy of it.
    from .schedule import Schedule

    total = Schedule.from_config(cfg).stop_step
    if cfg.checkpoint.every_steps > total:
        r.warn(f"checkpoint.every_steps={cfg.checkpoint.every_steps} > {total} steps in the run: only the "
               f"final and preemption checkpoints will be written")
    else:
        r.ok(f"checkpoint every {cfg.checkpoint.every_steps} steps ({total // cfg.checkpoint.every_steps} in the run), "
             f"keep {cfg.checkpoint.keep_last}, resume={cfg.checkpoint.resume}")


def _finish(r: DryRunReport, out: Callable[[str], None]) -> int:
    for line in r.lines:
        out(line)
    out(f"dry run {'FAIL' if r.errors else 'OK'}: {len(r.errors)} error(s), {len(r.warnings)} warning(s)")
    return 2 if r.errors else 0


__all__ = ["dry_run", "DryRunReport", "MemoryCheck"]
