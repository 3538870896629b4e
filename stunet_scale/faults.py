"""Fault injection for the reliability tests (off unless ``$STUNET_FAULTS`` is set).

Like Megatron's fault injector: the tests drive real failure paths through the real trainer
instead of mocking them. ``STUNET_FAULTS`` holds JSON, e.g.::

    {"nan": {"rank": 1, "steps": [3, 7, 8]},        non-finite loss on that rank at those steps
     "nan_from": {"rank": 0, "step": 9},            ... at every step >= 9 (until rollback limit)
     "spike": {"rank": 0, "steps": [6], "factor": 50},  that rank's (finite) loss x factor at those steps
     "signal": {"rank": 1, "step": 5, "name": "SIGUSR1"},   deliver a signal to itself at a step
     "hang": {"rank": 1, "step": 4},                sleep forever at a step (collective timeout test)
     "crash": {"rank": 1, "step": 7},               os._exit(13) at a step, in the first launch only
                                                    (torchrun's TORCHELASTIC_RESTART_COUNT == 0)
     "step_sleep": {"rank": 1, "seconds": 0.5},     a slow rank: sleep before every step (straggler test)
     "data_sleep": {"rank": 1, "seconds": 0.5},     ... or in its data pipeline, per micro-batch
     "data_hang": {"rank": 1, "step": 3},           the data pipeline (a DataLoader worker when
                                                    data.num_workers > 0) blocks forever at a step
     "slow_save_s": 5,                              sleep after writing checkpoint files
     "die_before_marker": true}                     os._exit(9) between manifest and COMMITTED

Steps are 0-based indices of the step about to run (the stream's ``step``).
"""

from __future__ import annotations

import json
import os
import signal
import time


class Faults:
    def __init__(self, rank: int, spec: dict | None = None):
        self.rank = rank
        self.spec = spec or {}

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        raw = os.environ.get("STUNET_FAULTS", "").strip()
        return cls(rank, json.loads(raw) if raw else {})

    @property
    def active(self) -> bool:
        return bool(self.spec)

    def _mine(self, key: str) -> dict | None:
        entry = self.spec.get(key)
        return entry if entry and int(entry.get("rank", 0)) == self.rank else None

    def nan_loss(self, step: int) -> bool:
        e = self._mine("nan")
        if e and step in e.get("steps", []):
            return True
        e = self._mine("nan_from")
        return bool(e and step >= int(e["step"]))

    def loss_factor(self, step: int) -> float:
        """What this rank's loss is multiplied by at ``step``: the "spike" fault's factor, else 1."""
        e = self._mine("spike")
        if e and step in e.get("steps", []):
            return float(e.get("factor", 100.0))
        return 1.0

    def in_data_pipeline(self, step: int) -> None:
        """Called where the rank's data is produced (a DataLoader worker when num_workers > 0)."""
        e = self._mine("data_sleep")
        if e:
            time.sleep(float(e["seconds"]))
        e = self._mine("data_hang")
        if e and step >= int(e["step"]):
            while True:  # a stuck read (NFS, a dead object store): no exception, no progress
                time.sleep(3600)

    def before_step(self, step: int) -> None:
        e = self._mine("crash")
        if e and step == int(e["step"]) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os._exit(13)  # a segfault or OOM kill in effect: no exception handler, no cleanup
        e = self._mine("step_sleep")
        if e:
            time.sleep(float(e["seconds"]))
        e = self._mine("signal")
        if e and step == int(e["step"]):
            os.kill(os.getpid(), getattr(signal, e.get("name", "SIGUSR1")))
        e = self._mine("hang")
        if e and step == int(e["step"]):
            # a hung rank that the launcher can still terminate (default SIGTERM action, not our flag)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(3600)

    def save_hook(self, stage: str) -> None:
        if stage == "files_written" and self.spec.get("slow_save_s"):
            time.sleep(float(self.spec["slow_save_s"]))
        if stage == "before_marker" and self.spec.get("die_before_marker"):
            os._exit(9)
