"""Fault injection for the reliability tests (off unless ``$STUNET_FAULTS`` is set).

Like Megatron's fault injector: the tests drive real failure paths through the real trainer
instead of mocking them. ``STUNET_FAULTS`` holds JSON, e.g.::

    {"nan": {"rank": 1, "steps": [3, 7, 8]},        non-finite loss on that rank at those steps
     "nan_from": {"rank": 0, "step": 9},            ... at every step >= 9 (until rollback limit)
     "signal": {"rank": 1, "step": 5, "name": "SIGUSR1"},   deliver a signal to itself at a step
     "hang": {"rank": 1, "step": 4},                sleep forever at a step (collective timeout test)
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
    def from_env(cls, rank: int) -> "Faults":
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

    def before_step(self, step: int) -> None:
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
