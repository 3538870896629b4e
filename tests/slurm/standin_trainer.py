"""A stand-in for `python -m stunet_scale.train` that keeps only its Slurm-facing contract.

Used by tests/test_slurm.py to prove the batch scripts' mechanics quickly: gloo process group
over every rank, ``checkpoint.resume: auto`` (continue from the newest checkpoint in run_dir,
same run id), SIGUSR1/SIGTERM only set a flag, ranks agree at the step boundary, save once,
write ``<run_dir>/REQUEUE`` and exit with the trainer's requeue code; exit 0 at
``schedule.max_steps``. Events go to ``<run_dir>/standin/events.jsonl`` for the test to read;
``STANDIN_CRASH_AT_STEP=k`` makes the last rank fail at step k (a bug, not a preemption).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from stunet_scale.config import load_config
from stunet_scale.train import EXIT_REQUEUE


def main(argv: list[str]) -> int:
    assert argv[0] == "--config"
    cfg = load_config(argv[1], argv[2:])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state_dir = Path(cfg.run_dir) / "standin"
    state_dir.mkdir(parents=True, exist_ok=True)
    latest = state_dir / "latest.json"

    def event(**kv):
        if rank == 0:
            with open(state_dir / "events.jsonl", "a") as f:
                f.write(json.dumps({"time": time.time(), "job": os.environ.get("SLURM_JOB_ID"),
                                    "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "world": world, **kv}) + "\n")

    got = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: got.append(s))  # a flag only

    start = json.loads(latest.read_text()) if latest.exists() else {"step": 0, "run_id": uuid.uuid4().hex}
    step, run_id = start["step"], start["run_id"]
    event(kind="start", step=step, run_id=run_id)
    stop = cfg.schedule.max_steps

    def save():
        if rank == 0:
            (state_dir / f"ckpt-{step:06d}.json").write_text(json.dumps({"step": step, "run_id": run_id}))
            tmp = latest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "run_id": run_id}))
            tmp.replace(latest)
        dist.barrier()

    crash_at = int(os.environ.get("STANDIN_CRASH_AT_STEP", "0"))
    while step < stop:
        time.sleep(0.3)
        step += 1
        if step == crash_at and rank == world - 1:
            raise RuntimeError(f"stand-in crash at step {step} (STANDIN_CRASH_AT_STEP)")
        if rank == 0:
            (state_dir / "progress").write_text(str(step))
        flag = torch.tensor([1 if got else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's signal stops all
        if flag.item():
            save()
            if rank == 0:
                (Path(cfg.run_dir) / "REQUEUE").write_text(json.dumps({"step": step}))
            event(kind="preempted", step=step, run_id=run_id, signals=got)
            dist.destroy_process_group()
            return EXIT_REQUEUE
    save()
    if rank == 0:
        (Path(cfg.run_dir) / "REQUEUE").unlink(missing_ok=True)
    event(kind="finished", step=step, run_id=run_id)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
