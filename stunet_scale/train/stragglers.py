"""Straggler detection: a rank persistently slower than the others, named with its host and cause.

Per-rank data wait and compute are summed over a log window (``tracking.log_every_steps`` steps)
and compared once per window, with one all-reduce of 2 x world_size floats (each rank fills its
own slots), not one per step. Compute is the time from the batch being ready to the step's first
collective (the forward of the first micro-batch): a rank's own work, before any wait for peers.
A rank slower than ``tracking.straggler_factor`` x the median rank in ``tracking.straggler_windows``
consecutive windows is logged (rank 0) with its host and whether its time goes to data or compute,
and recorded as a ``straggler`` row of metrics.jsonl.
"""

from __future__ import annotations

import logging

from ..parallel.distributed import hostname

log = logging.getLogger("stunet_scale.train")


class StragglerWatch:
    def __init__(self, tracking_cfg, env, record):
        """``record``: where a straggler row goes (RunReport.record). Collective: gathers the hosts once."""
        self.cfg, self.env, self.record = tracking_cfg, env, record
        self._window = [0.0, 0.0, 0]  # [data wait, compute, steps] of this log window
        self._slow_windows: dict[int, int] = {}
        self._hosts = env.all_gather_object(hostname()) if env.world_size > 1 else [hostname()]

    def step(self, m: dict) -> None:
        """Add one step's ``data_wait`` and ``local_compute``; compare the ranks at the end of a log window."""
        t, env = self.cfg, self.env
        win = self._window
        win[0] += m["data_wait"]
        # not step_time - data_wait: that includes waiting in collectives for the slow rank, which
        # makes every rank look as slow as the straggler; up to the first collective is this rank's own
        win[1] += m["local_compute"]
        win[2] += 1
        if m["step"] % t.log_every_steps or env.world_size == 1:
            return
        world, rank = env.world_size, env.rank
        mine = [0.0] * (2 * world)
        mine[2 * rank], mine[2 * rank + 1] = win[0] / win[2], win[1] / win[2]
        per_rank = env.all_reduce(mine, "sum")
        self._window = [0.0, 0.0, 0]
        totals = [per_rank[2 * r] + per_rank[2 * r + 1] for r in range(world)]
        median = sorted(totals)[world // 2] if world % 2 else sum(sorted(totals)[world // 2 - 1: world // 2 + 1]) / 2
        for r in range(world):
            slow = totals[r] > t.straggler_factor * median
            self._slow_windows[r] = self._slow_windows.get(r, 0) + 1 if slow else 0
            if self._slow_windows[r] == t.straggler_windows and env.is_main:
                host = self._hosts[r]
                data, compute = per_rank[2 * r], per_rank[2 * r + 1]
                cause = "its data pipeline" if data > compute else "compute"
                log.warning("straggler: rank %d on %s was slower than %.1fx the median rank in %d consecutive log windows: "
                            "%.3f s/step data wait + %.3f s/step compute vs a median of %.3f s/step (mostly %s)",
                            r, host, t.straggler_factor, t.straggler_windows, data, compute, median, cause)
                self.record({"kind": "straggler", "step": m["step"], "rank": r, "host": host,
                             "data_wait_s": data, "compute_s": compute, "median_s": median})
