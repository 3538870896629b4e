"""The run-dir lease (stunet_scale/train/run_lease.py): one job per run dir.

Unit tests drive RunLease with planted holders (another host, a live or dead pid, the same Slurm
job); the end-to-end tests run the real trainer (configs/debug.yaml) twice on one run dir and check
that the second job refuses at once with exit 2 on every rank while the first finishes untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from stunet_scale.config import ConfigError, load_config
from stunet_scale.train import run_lease
from stunet_scale.train.run_lease import LEASE_FILE, Holder, LeaseHeld, RunLease, process_start_ticks

REAL_SLURM_JOB_STATE = run_lease.slurm_job_state


@pytest.fixture(autouse=True)
def no_squeue(monkeypatch):
    """The planted Slurm job ids are made up: a real squeue (the CI's local cluster) would call them ended."""
    monkeypatch.setattr(run_lease, "slurm_job_state", lambda job_id: None)


def holder(**changes) -> Holder:
    return dataclasses.replace(Holder.this_process(environ={}), **changes)


def plant(run_dir: Path, h: Holder) -> RunLease:
    lease = RunLease(run_dir, me=h, on_lost=lambda msg: None)
    assert lease.acquire() is None
    return lease


def on_disk(run_dir: Path) -> dict:
    return json.loads((run_dir / LEASE_FILE).read_text())


@pytest.fixture
def live_child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_free_run_dir_is_taken_renewed_and_released(tmp_path):
    lease = RunLease(tmp_path / "run", renew_every_s=1, stale_after_s=3)
    assert lease.acquire() is None
    first = on_disk(tmp_path / "run")
    assert first["pid"] == os.getpid() and first["token"] == lease.me.token and first["renewals"] == 0
    lease.renew()
    assert on_disk(tmp_path / "run")["renewals"] == 1
    lease.release()
    assert not (tmp_path / "run" / LEASE_FILE).exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no private or probe files left behind


def test_live_holder_is_refused_naming_it_and_the_override(tmp_path, live_child):
    other = holder(pid=live_child.pid, pid_start=process_start_ticks(live_child.pid), slurm_job_id="4242",
                   since=time.time() - 3600, command="python -m stunet_scale.train --config a.yaml")
    plant(tmp_path, other)
    t0 = time.time()
    with pytest.raises(LeaseHeld) as e:
        RunLease(tmp_path).acquire()
    msg = str(e.value)
    assert time.time() - t0 < 1.0
    for part in (other.host, f"pid {live_child.pid}", "Slurm job 4242", "since ", "lease.take_over=true",
                 "lease.stale_after_s", "a.yaml"):
        assert part in msg, (part, msg)
    assert isinstance(e.value, ConfigError)  # the trainer's exit 2 path
    assert on_disk(tmp_path)["token"] == other.token  # untouched


def test_live_holder_on_another_host_is_refused(tmp_path):
    plant(tmp_path, holder(host="gpu-node-17", boot_id="another-boot", pid=1))
    with pytest.raises(LeaseHeld, match="host gpu-node-17, pid 1"):
        RunLease(tmp_path).acquire()


def test_dead_pid_on_this_host_is_taken_over_with_a_log_line(tmp_path, caplog):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_ticks(proc.pid)
    proc.wait()
    plant(tmp_path, holder(pid=proc.pid, pid_start=start))
    lease = RunLease(tmp_path)
    with caplog.at_level("WARNING", logger="stunet_scale.train"):
        reason = lease.acquire()
    assert f"its process {proc.pid} on this host" in reason and "is gone" in reason
    assert "took over the lease" in caplog.text and f"pid {proc.pid}" in caplog.text
    assert on_disk(tmp_path)["token"] == lease.me.token
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE_FILE]  # the old lease is not left aside


def test_reused_pid_counts_as_gone(tmp_path, live_child):
    # the pid exists, but it is a process started at another time than the holder
    plant(tmp_path, holder(pid=live_child.pid, pid_start=process_start_ticks(live_child.pid) - 100))
    assert "is gone" in RunLease(tmp_path).acquire()


def test_expired_lease_is_taken_over_by_filesystem_time(tmp_path, caplog):
    plant(tmp_path, holder(host="gpu-node-17", boot_id="another-boot", pid=1))
    old = time.time() - 1000
    os.utime(tmp_path / LEASE_FILE, (old, old))  # last renewal 1000 s ago by the filesystem's clock
    with caplog.at_level("WARNING", logger="stunet_scale.train"):
        reason = RunLease(tmp_path, stale_after_s=300).acquire()
    assert "not renewed for 1000 s" in reason and "host gpu-node-17" in caplog.text
    # a renewal inside the window keeps it: a fresh lease of a live remote holder is refused
    plant(tmp_path / "fresh", holder(host="gpu-node-17", boot_id="another-boot", pid=1))
    with pytest.raises(LeaseHeld, match="last renewed 0 s ago"):
        RunLease(tmp_path / "fresh", stale_after_s=300).acquire()


def test_requeued_slurm_job_takes_over_its_own_lease(tmp_path, live_child):
    alive = dict(host="gpu-node-17", boot_id="another-boot", pid=live_child.pid)
    plant(tmp_path, holder(slurm_job_id="777", slurm_restart_count=None, **alive))
    me = holder(slurm_job_id="777", slurm_restart_count="1")
    reason = RunLease(tmp_path, me=me).acquire()
    assert "same Slurm job 777, requeued (SLURM_RESTART_COUNT 0 -> 1)" in reason
    # two steps of one allocation (same restart count) are two live jobs: refused
    plant(tmp_path / "b", holder(slurm_job_id="777", slurm_restart_count="1", **alive))
    with pytest.raises(LeaseHeld, match="Slurm job 777"):
        RunLease(tmp_path / "b", me=holder(slurm_job_id="777", slurm_restart_count="1")).acquire()
    # another job id is another job
    with pytest.raises(LeaseHeld):
        RunLease(tmp_path / "b", me=holder(slurm_job_id="778", slurm_restart_count="2")).acquire()


def test_holder_whose_slurm_job_ended_is_taken_over(tmp_path, monkeypatch):
    # a stand-in squeue: job 500 runs, job 501 has ended (chain mode's follow-up after a hard kill)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text('#!/bin/sh\ncase "$*" in *" 500 "*) echo RUNNING;; *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(run_lease, "slurm_job_state", REAL_SLURM_JOB_STATE)
    remote = dict(host="gpu-node-17", boot_id="another-boot", pid=1)
    plant(tmp_path / "a", holder(slurm_job_id="500", **remote))
    with pytest.raises(LeaseHeld, match="Slurm job 500"):
        RunLease(tmp_path / "a", me=holder(slurm_job_id="502")).acquire()
    plant(tmp_path / "b", holder(slurm_job_id="501", **remote))
    reason = RunLease(tmp_path / "b", me=holder(slurm_job_id="502")).acquire()
    assert "its Slurm job 501 is no longer running (squeue: not listed)" in reason


def test_take_over_override_and_the_old_holder_stops_at_its_next_renewal(tmp_path, live_child):
    old = plant(tmp_path, holder(pid=live_child.pid, pid_start=process_start_ticks(live_child.pid)))
    lost = []
    old.on_lost = lost.append
    new = RunLease(tmp_path, take_over=True)
    assert "lease.take_over=true was given" in new.acquire()
    old.renew()
    assert lost and "was taken over by" in lost[0] and f"pid {os.getpid()}" in lost[0]
    old.release()  # not ours any more: must not remove the new holder's lease
    assert on_disk(tmp_path)["token"] == new.me.token


def test_a_foreign_lease_file_is_refused_not_guessed(tmp_path):
    (tmp_path / LEASE_FILE).write_text("locked by bob\n")
    with pytest.raises(LeaseHeld, match="not a lease this toolkit wrote"):
        RunLease(tmp_path).acquire()


def test_lease_keys_are_validated():
    cfg = load_config(None, ["lease.renew_every_s=10", "lease.stale_after_s=60", "lease.take_over=true"])
    assert (cfg.lease.renew_every_s, cfg.lease.stale_after_s, cfg.lease.take_over) == (10, 60, True)
    with pytest.raises(ConfigError, match="lease.stale_after_s must be >= 3"):
        load_config(None, ["lease.renew_every_s=30", "lease.stale_after_s=60"])
    with pytest.raises(ConfigError, match="lease.renew_every_s must be >= 1"):
        load_config(None, ["lease.renew_every_s=0"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(None, ["lease.take_overr=true"])


# --------------------------------------------------------------------------------------------
# the real trainer: two jobs on one run dir
# --------------------------------------------------------------------------------------------

TRAIN = ["tracking.enabled=true", "tracking.log_every_steps=1", "validation.enabled=false", "schedule.global_batch=2",
         "schedule.micro_batch=1", "checkpoint.every_steps=4", "checkpoint.keep_last=10", "schedule.max_steps=24",
         "distributed.precision=fp32", "distributed.timeout_s=60"]


def trainer_cmd(nproc: int, run_dir: Path, data_root: Path, *overrides) -> list[str]:
    args = [str(REPO / "tests" / "train_harness.py"), "--config", str(REPO / "configs" / "debug.yaml"),
            f"run_dir={run_dir}", f"data.root={data_root}", *TRAIN, *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def trainer_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), STUNET_TEST_DATA="real",
               **extra)
    for key in ("STUNET_FAULTS", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        env.pop(key, None)
    env.update(extra)
    return env


def wait_for(cond, timeout: float, what: str, proc=None):
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def train_rows(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_second_job_refuses_at_once_on_every_rank_and_the_first_finishes_untouched(tmp_path, prepared_demo):
    run = tmp_path / "run"
    # job A: 2 ranks (DDP), slowed by a 1 s sleep after writing each checkpoint's files, so job B
    # arrives while A trains and again while A is in the middle of a save
    log_a = tmp_path / "job_a.log"
    first = subprocess.Popen(trainer_cmd(2, run, prepared_demo, "distributed.backend=ddp"), cwd=REPO,
                             env=trainer_env(STUNET_FAULTS=json.dumps({"slow_save_s": 1})),
                             stdout=log_a.open("w"), stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run / LEASE_FILE).exists() and len(train_rows(run)) >= 1, 120, "job A's first step", first)
        config_before = (run / "config.yaml").read_bytes()
        wait_for(lambda: any(run.glob("checkpoints/*.tmp")), 120, "job A's save in flight", first)
        # job B: the same command, 2 ranks, while A's save is in flight
        t0 = time.time()
        second = subprocess.run(trainer_cmd(2, run, prepared_demo, "distributed.backend=ddp"), cwd=REPO,
                                env=trainer_env(), capture_output=True, text=True, timeout=120)
        refused_after = time.time() - t0
        out = second.stdout + second.stderr
        assert second.returncode != 0
        assert out.count("exitcode  : 2") == 2 or out.count("exit code 2") >= 1, out[-4000:]
        holder = on_disk(run)
        assert f"pid {holder['pid']}" in out and f"host {holder['host']}" in out and "lease.take_over=true" in out
        assert "[rank 1]" in out or out.count("is in use by another job") >= 1
        # one process (no launcher) gets the code directly
        t1 = time.time()
        single = subprocess.run(trainer_cmd(1, run, prepared_demo, "distributed.backend=ddp"), cwd=REPO,
                                env=trainer_env(), capture_output=True, text=True, timeout=120)
        single_after = time.time() - t1
        assert single.returncode == 2, (single.stdout + single.stderr)[-4000:]
        assert "is in use by another job" in single.stderr
        assert (run / "config.yaml").read_bytes() == config_before  # B wrote none of the run files
        first.wait(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
        first_out = log_a.read_text()
        print(first_out[-3000:])
    assert first.returncode == 0, first_out[-6000:]
    assert "removed unfinished checkpoint" not in first_out
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name != "latest")
    assert ckpts == [f"step_{s:09d}" for s in (4, 8, 12, 16, 20, 24)], ckpts  # none moved aside, none missing
    assert not list(run.rglob("*replaced*"))
    rows = train_rows(run)
    assert rows == list(range(1, 25)), rows  # no duplicate metric rows
    launches = (run / "launches.jsonl").read_text().splitlines()
    assert len(launches) == 1  # only A's start is recorded
    assert not (run / LEASE_FILE).exists()  # released at A's exit
    print(f"refused: 2 ranks under torchrun in {refused_after:.1f} s, one process in {single_after:.1f} s")


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_killed_job_lease_is_taken_over_by_the_next_run_and_by_its_requeue(tmp_path, prepared_demo):
    run = tmp_path / "run"
    env = trainer_env(SLURM_JOB_ID="31337")
    job = subprocess.Popen(trainer_cmd(1, run, prepared_demo, "distributed.backend=none", "schedule.max_steps=400",
                                       "tracking.enabled=false"),
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(train_rows(run)) >= 2, 120, "the first job's steps", job)
    finally:
        job.kill()
        job.wait()
    assert on_disk(run)["pid"] == job.pid  # SIGKILL left the lease behind
    # its requeue (same job id, next restart count) takes it over; so would anyone, since the pid is gone
    requeued = subprocess.run(trainer_cmd(1, run, prepared_demo, "distributed.backend=none", "schedule.max_steps=4",
                                          "tracking.enabled=false"),
                              cwd=REPO, env=trainer_env(SLURM_JOB_ID="31337", SLURM_RESTART_COUNT="1"),
                              capture_output=True, text=True, timeout=180)
    assert requeued.returncode == 0, requeued.stderr[-4000:]
    assert "took over the lease" in requeued.stderr and "same Slurm job 31337, requeued" in requeued.stderr
    assert not (run / LEASE_FILE).exists()
