"""Ranks die with their launcher (stunet_scale/parallel/launcher_watch.py over stunet_scale/parent_watch.py).

SIGKILL of torchrun alone (the OOM killer, a node agent) used to leave its rank processes training
and writing checkpoints. Here: which parent is watched under which launcher, a stand-in launcher
killed under each of them, and the real trainer under torchrun (2 ranks, gloo) killed mid-save.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

from stunet_scale.parallel.launcher_watch import launcher_to_watch


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def test_which_parent_is_watched(tmp_path):
    me = os.getpid()
    assert launcher_to_watch({}, ppid=me) is None  # plain python
    assert launcher_to_watch({"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}, ppid=me) is None
    assert launcher_to_watch({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0"}, ppid=me) == (me, "torchrun")
    assert launcher_to_watch({"TORCHELASTIC_RUN_ID": "x", "ACCELERATE_MIXED_PRECISION": "no"}, ppid=me)[1] == "accelerate launch"
    assert launcher_to_watch({"RANK": "0", "LOCAL_RANK": "0"}, ppid=me)[0] == me  # e.g. the deepspeed CLI
    # srun's task: the parent is slurmstepd, which Slurm manages; not watched even with torchrun's variables
    fake = tmp_path / "slurmstepd"
    shutil.copy(shutil.which("sleep"), fake)
    stepd = subprocess.Popen([str(fake), "30"])
    try:
        time.sleep(0.2)
        assert launcher_to_watch({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0"}, ppid=stepd.pid) is None
    finally:
        stepd.kill()
        stepd.wait()


# A stand-in launcher: starts one "rank" that arms the watch like init_distributed() does and then
# works forever, printing its pid; the test SIGKILLs the launcher and watches the rank.
LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stderr=open(sys.argv[2], "w"))
    print(rank.pid, flush=True)
    time.sleep(120)
""")
RANK = textwrap.dedent("""
    import time
    from stunet_scale.parallel.launcher_watch import start_launcher_watch
    start_launcher_watch()
    while True:
        sum(range(10000))  # busy, as a training step is
""")


def run_and_kill_launcher(tmp_path, env_extra: dict) -> tuple[int, float | None, str]:
    """(rank pid, seconds the rank outlived its launcher or None if it survived 5 s, rank's stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID")}
    env.update(PYTHONPATH=str(REPO), **env_extra)
    log = tmp_path / "rank.err"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(log)], env=env, stdout=subprocess.PIPE, text=True)
    rank = int(launcher.stdout.readline())
    time.sleep(3)  # the rank has imported and armed its watch
    assert alive(rank)
    t_kill = time.time()
    launcher.kill()
    launcher.wait()
    while alive(rank) and time.time() - t_kill < 5:
        time.sleep(0.05)
    outlived = None if alive(rank) else time.time() - t_kill
    if outlived is None:
        os.kill(rank, signal.SIGKILL)
    return rank, outlived, log.read_text()


@pytest.mark.timeout(60)
def test_rank_exits_when_its_launcher_is_killed(tmp_path):
    # another launcher (LOCAL_RANK + RANK): the watch thread notices, says why, exits
    rank, by_thread, err = run_and_kill_launcher(tmp_path, {"RANK": "0", "LOCAL_RANK": "0"})
    assert by_thread is not None and by_thread < 2.0, err
    assert f"rank process {rank}: its launcher" in err and "is gone" in err and "exiting without writing" in err
    # torchrun (TORCHELASTIC_RUN_ID): PR_SET_PDEATHSIG's SIGKILL, even if the process could not run Python
    rank, by_pdeathsig, err = run_and_kill_launcher(tmp_path, {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0"})
    assert by_pdeathsig is not None and by_pdeathsig < 2.0, err
    # no launcher (plain python, nohup): the parent may go, the process stays
    rank, outlived, err = run_and_kill_launcher(tmp_path, {})
    assert outlived is None, err
    print(f"rank outlived its launcher by {by_thread:.2f} s (watch thread), {by_pdeathsig:.2f} s (PR_SET_PDEATHSIG)")


def committed(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if not p.name.endswith(".tmp")
                  and (p / "COMMITTED").exists())


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_sigkill_of_torchrun_ends_its_ranks_without_another_checkpoint(tmp_path, prepared_demo):
    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), STUNET_TEST_DATA="real",
               STUNET_FAULTS=json.dumps({"slow_save_s": 2}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "train_harness.py"), "--config", str(REPO / "configs" / "debug.yaml"),
           f"run_dir={run}", f"data.root={prepared_demo}", "tracking.enabled=false", "validation.enabled=false",
           "tracking.log_every_steps=1", "schedule.global_batch=2", "schedule.micro_batch=1", "checkpoint.every_steps=3",
           "checkpoint.keep_last=100", "schedule.max_steps=300", "distributed.backend=ddp", "distributed.precision=fp32",
           "distributed.timeout_s=60"]
    log = tmp_path / "torchrun.log"
    torchrun = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    ranks: list[int] = []
    try:
        t0 = time.time()
        # kill during the second save: files written, not committed (slow_save_s holds it there)
        while not (committed(run) and (run / "checkpoints" / "step_000000006.tmp").exists()):
            assert torchrun.poll() is None, log.read_text()[-4000:]
            assert time.time() - t0 < 150, "the run did not reach its second save"
            time.sleep(0.05)
        ranks = children(torchrun.pid)
        assert len(ranks) == 2, ranks
        before = committed(run)
        t_kill = time.time()
        torchrun.send_signal(signal.SIGKILL)  # torchrun alone: its ranks run in their own sessions
        torchrun.wait()
        while any(alive(r) for r in ranks) and time.time() - t_kill < 30:
            time.sleep(0.05)
        outlived = time.time() - t_kill
        survivors = [r for r in ranks if alive(r)]
        assert not survivors, f"ranks {survivors} outlived torchrun by > 30 s"
        time.sleep(3)  # anything still writing would show now
        assert committed(run) == before == ["step_000000003"], (before, committed(run))
        metrics_mtime = (run / "metrics.jsonl").stat().st_mtime
        assert metrics_mtime <= t_kill + 0.05, metrics_mtime - t_kill
        print(f"ranks gone {outlived:.2f} s after SIGKILL of torchrun; committed: {before}")
    finally:
        for r in ranks:
            if alive(r):
                os.kill(r, signal.SIGKILL)
        if torchrun.poll() is None:
            torchrun.kill()
