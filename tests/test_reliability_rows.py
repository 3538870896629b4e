"""Rows of the README's Reliability checks table that need their own scenario (the table maps
every row to its test). Each test drives the real code path; the multi-process ones
start the real trainer or real processes, with timeouts of seconds, not minutes.
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

from stunet_scale.checkpointing.commit import (
    MARKER,
    apply_retention,
    list_checkpoints,
    step_dirname,
)
from stunet_scale.config import ConfigError, load_config

# ------------------------------------------------------------------------------------------------
# row 5: retention with K rolling + milestones while a save is in flight
# ------------------------------------------------------------------------------------------------

def _committed(root: Path, step: int) -> Path:
    d = root / step_dirname(step)
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"x")
    (d / MARKER).write_text("{}")
    return d


def test_retention_never_removes_an_in_flight_save_the_newest_or_a_milestone(tmp_path):
    """10 saves with K=2 and a milestone every 40 steps. Before each commit the next save is in
    flight (its ``.tmp`` dir and, from a rank that renamed already, a final dir without its marker);
    retention running then must leave both, the newest committed and every milestone alone."""
    for step in range(10, 110, 10):
        tmp = tmp_path / (step_dirname(step) + ".tmp")
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"half")
        unmarked = tmp_path / step_dirname(step + 5)  # renamed into place, marker not yet written
        unmarked.mkdir()
        apply_retention(tmp_path, keep_last=2, milestone_every=40)
        assert tmp.is_dir() and (tmp / "weights.bin").read_bytes() == b"half"
        assert unmarked.is_dir()
        unmarked.rmdir()
        shutil.rmtree(tmp)
        _committed(tmp_path, step)
        apply_retention(tmp_path, keep_last=2, milestone_every=40)
        kept = [s for s, _ in list_checkpoints(tmp_path)]
        assert kept[0] == step  # the newest committed checkpoint survives its own retention pass
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100, 90, 80, 40]
    # K < 2 is refused by the config before any run (the newest may be the one being written)
    with pytest.raises(ConfigError, match="keep_last"):
        load_config(None, ["checkpoint.keep_last=1"])


# ------------------------------------------------------------------------------------------------
# row 9: per-rank RNG restore in a fresh process
# ------------------------------------------------------------------------------------------------

_RNG_SCRIPT = textwrap.dedent("""
    import json, random, sys
    import numpy as np, torch
    from stunet_scale.checkpointing.state import load_rng, restore_rng, save_rng, seed_everything
    mode, ckpt, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def draws(n=100):
        return [[random.random() for _ in range(n)], np.random.rand(n).tolist(), torch.rand(n).tolist(),
                torch.randint(0, 2**31, (n,)).tolist()]
    if mode == "save":
        seed_everything(7, rank)
        draws(13)  # the run so far
        save_rng(ckpt, rank)
        print(json.dumps(draws()))  # what the uninterrupted run draws next
    else:
        seed_everything(12345, rank)  # a fresh process seeds as a new run would, then restores
        restore_rng(load_rng(ckpt, rank))
        print(json.dumps(draws()))
""")


def test_rng_restored_per_rank_in_fresh_processes_continues_each_ranks_stream(tmp_path):
    script = tmp_path / "rng.py"
    script.write_text(_RNG_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def run(mode: str, rank: int) -> list:
        out = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "ckpt"), str(rank)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    uninterrupted = {rank: run("save", rank) for rank in (0, 1)}
    resumed = {rank: run("restore", rank) for rank in (0, 1)}
    for rank in (0, 1):
        assert resumed[rank] == uninterrupted[rank], f"rank {rank}: next 100 draws differ after restore"
    assert uninterrupted[0] != uninterrupted[1]  # per-rank streams, not one stream copied to both ranks


# ------------------------------------------------------------------------------------------------
# row 18: a truncated or tampered tar shard fails the trainer's pre-flight, before training starts
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def wds_copy(prepared_demo, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(prepared_demo, root)
    shard = sorted((root / "wds").glob("*.tar"))[0]
    return root, shard


def _train_wds(root: Path, run_dir: Path, *overrides) -> int:
    from stunet_scale.train.loop import run
    from stunet_scale.train.preflight import validate

    cfg = load_config(REPO / "configs" / "debug.yaml",
                      [f"data.root={root}", "data.format=wds", f"run_dir={run_dir}", "tracking.enabled=false",
                       "distributed.backend=none", "data.num_workers=0", "schedule.max_steps=1", *overrides])
    validate(cfg, world_size=1)  # what train/__main__.py runs on every rank before run()
    return run(cfg)


@pytest.mark.parametrize("damage", ["truncate_inside_member", "truncate_at_member_boundary", "flip_byte"])
def test_damaged_shard_fails_preflight_naming_the_shard(wds_copy, tmp_path, damage):
    root, shard = wds_copy
    data = shard.read_bytes()
    overrides = []
    if damage == "truncate_inside_member":
        shard.write_bytes(data[: len(data) // 2 + 7])
    elif damage == "truncate_at_member_boundary":
        import tarfile

        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        shard.write_bytes(data[: members[-1].offset])  # ends cleanly before the last member's header
    else:
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 0xFF
        shard.write_bytes(bytes(flipped))
        overrides = ["data.verify_shards=sha256"]  # same size: only the hash finds it
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        _train_wds(root, run_dir, *overrides)
    msg = str(err.value)
    assert shard.name in msg and "manifest" in msg and "prepare" in msg, msg
    assert not run_dir.exists()  # refused before the trainer wrote anything (no lease, no metrics)


def test_intact_shards_pass_preflight_with_sha256(wds_copy, tmp_path):
    from stunet_scale.train.preflight import validate

    root, _ = wds_copy
    cfg = load_config(REPO / "configs" / "debug.yaml", [f"data.root={root}", "data.format=wds", "data.verify_shards=sha256",
                                                        f"run_dir={tmp_path / 'run'}"])
    assert validate(cfg, world_size=1).store.manifest["wds_shards"]


# ------------------------------------------------------------------------------------------------
# the real trainer in subprocesses (rows 12, 13, 14, 17): demo data, tiny model, gloo
# ------------------------------------------------------------------------------------------------

FAST = ["tracking.enabled=false", "tracking.log_every_steps=1", "validation.enabled=false", "schedule.global_batch=4",
        "schedule.micro_batch=2", "distributed.precision=fp32", "data.patch_size=[16,16,16]",
        "model.width_multipliers=[1,2,4]", "model.pool_strides=[[2,2,2],[2,2,2]]",
        "model.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3]]", "loss.deep_supervision_weights=[0.67,0.33]"]


def start_trainer(nproc: int, run_dir: Path, data_root: Path, *overrides, faults=None, torchrun_args=()):
    """The trainer as a job would run it, in its own process group (as under Slurm); returns the Popen."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), STUNET_TEST_DATA="real")
    env.pop("STUNET_FAULTS", None)
    if faults:
        env["STUNET_FAULTS"] = json.dumps(faults)
    args = [str(REPO / "tests" / "train_harness.py"), "--config", str(REPO / "configs" / "debug.yaml"),
            f"run_dir={run_dir}", f"data.root={data_root}", *FAST, *overrides]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *torchrun_args, *args] if nproc > 1 else [sys.executable, *args])
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{out[-4000:]}")
    return out


def train_records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind] if path.exists() else []


def wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.1)


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes."""
    import psutil

    out = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.Error, OSError):
            continue
        if rank is not None and "train_harness.py" in " ".join(child.cmdline()):
            out[int(rank)] = child.pid
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_data_pipeline_hang_ends_both_ranks_with_stack_dumps_and_the_hang_code(prepared_demo, tmp_path):
    """Row 14, data pipeline: rank 1's DataLoader worker blocks forever at step 3. Rank 0's next
    collective times out (10 s) and rank 1's step watchdog fires (timeout + 5 s): both dump every
    thread's stack under run_dir/hang/ and exit with EXIT_HANG, well inside a bound."""
    from stunet_scale.parallel.distributed import EXIT_HANG

    run_dir = tmp_path / "run"
    t0 = time.time()
    proc = start_trainer(2, run_dir, prepared_demo, "distributed.backend=ddp", "distributed.timeout_s=10",
                         "data.num_workers=2", "schedule.max_steps=40", "checkpoint.every_steps=100",
                         faults={"data_hang": {"rank": 1, "step": 3}})
    out = finish(proc, 100)
    elapsed = time.time() - t0
    assert proc.returncode != 0, out[-4000:]
    assert f"exitcode  : {EXIT_HANG}" in out or f"exitcode: {EXIT_HANG}" in out, out[-4000:]
    dumps = {p.name: p.read_text() for p in (run_dir / "hang").glob("rank_*.txt")}
    assert set(dumps) == {"rank_00000.txt", "rank_00001.txt"}, (dumps.keys(), out[-4000:])
    assert "collective timed out" in dumps["rank_00000.txt"]
    assert "no training step started" in dumps["rank_00001.txt"] and "Thread 0x" in dumps["rank_00001.txt"]
    assert "dataloader.py" in dumps["rank_00001.txt"]  # the main thread's stack shows where it waits
    assert elapsed < 120, elapsed


@pytest.mark.timeout(120)
def test_a_hung_data_pipeline_on_the_mlflow_rank_ends_its_run_failed(prepared_demo, tmp_path):
    """Row 14 on the rank that owns the MLflow run: its main thread is stuck, so the step watchdog
    ends the run FAILED (reason "hang: ...") before it exits with EXIT_HANG; nothing is left RUNNING."""
    from stunet_scale.parallel.distributed import EXIT_HANG

    mlflow = pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    proc = start_trainer(1, run_dir, prepared_demo, "distributed.backend=none", "distributed.timeout_s=5",
                         "data.num_workers=2", "schedule.max_steps=40", "checkpoint.every_steps=100",
                         "tracking.enabled=true", faults={"data_hang": {"rank": 0, "step": 3}})
    out = finish(proc, 100)
    assert proc.returncode == EXIT_HANG, out[-4000:]
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stunet-debug").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"], out[-4000:]
    assert runs[0].data.tags["end_reason"].startswith("hang: rank 0: no training step started")


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_sigstopped_rank_fails_its_peer_within_the_collective_timeout(prepared_demo, tmp_path):
    """Row 14, SIGSTOP: a frozen rank cannot report anything; its peer must end within the
    collective timeout with its stack dump and EXIT_HANG instead of waiting forever."""
    from stunet_scale.parallel.distributed import EXIT_HANG

    run_dir = tmp_path / "run"
    proc = start_trainer(2, run_dir, prepared_demo, "distributed.backend=ddp", "distributed.timeout_s=10",
                         "schedule.max_steps=400", "checkpoint.every_steps=1000")
    wait_for(lambda: len(train_records(run_dir)) >= 2, 120, proc, "two logged steps")
    pids = rank_pids(proc.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGSTOP)
    t_stop = time.time()
    dump = run_dir / "hang" / "rank_00000.txt"
    wait_for(dump.is_file, 60, proc, "rank 0's stack dump")
    waited = time.time() - t_stop
    os.kill(pids[1], signal.SIGCONT)  # the launcher's SIGTERM/SIGKILL reach it once it runs again
    out = finish(proc, 90)
    assert 8 <= waited <= 30, waited  # the 10 s collective timeout, not the job's wall time
    assert "collective timed out" in dump.read_text()
    assert f"exitcode  : {EXIT_HANG}" in out or f"exitcode: {EXIT_HANG}" in out, out[-4000:]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_to_the_whole_process_group_reaches_workers_and_only_the_main_process_acts(prepared_demo, tmp_path,
                                                                                             signame):
    """Row 12: Slurm and `kill -- -PGID` signal every process of the job, DataLoader workers
    included. The workers must neither die (torch's own SIGTERM handler did: 'DataLoader worker is
    killed by signal') nor act; the main process saves once and exits with the requeue code."""
    from stunet_scale.train import EXIT_REQUEUE

    run_dir = tmp_path / "run"
    proc = start_trainer(1, run_dir, prepared_demo, "distributed.backend=none", "data.num_workers=2",
                         "schedule.max_steps=400", "checkpoint.every_steps=1000")
    wait_for(lambda: len(train_records(run_dir)) >= 2, 90, proc, "two logged steps")
    import psutil

    workers = [c.pid for c in psutil.Process(proc.pid).children()]
    assert len(workers) == 2, workers  # the DataLoader workers share the job's process group
    os.killpg(proc.pid, getattr(signal, signame))
    out = finish(proc, 60)
    assert proc.returncode == EXIT_REQUEUE, out[-4000:]
    assert "Traceback" not in out and "killed by signal" not in out, out[-4000:]
    saves = train_records(run_dir, "checkpoint")
    assert len(saves) == 1 and saves[0]["step"] == json.loads((run_dir / "REQUEUE").read_text())["step"], saves
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [saves[0]["step"]]
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers)


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_rank_crash_fails_the_peer_at_once_and_the_launcher_restart_resumes(prepared_demo, tmp_path):
    """Row 13: rank 1 dies with os._exit mid-run (no exception, no cleanup: an OOM kill in effect).
    Its peer fails promptly (a dead peer's closed socket, not the 60 s collective timeout);
    ``torchrun --max-restarts=1`` starts the ranks again and they resume from the last committed
    checkpoint and finish. The restart needs the per-attempt store namespace
    (stunet_scale.parallel.distributed.restart_safe_store): without it the restarted gloo group
    reads the dead attempt's addresses and never connects."""
    run_dir = tmp_path / "run"
    opts = ["distributed.backend=ddp", "distributed.timeout_s=60", "schedule.max_steps=10", "checkpoint.every_steps=2"]
    t0 = time.time()
    proc = start_trainer(2, run_dir, prepared_demo, *opts, faults={"crash": {"rank": 1, "step": 7}},
                         torchrun_args=["--max-restarts=1"])
    out = finish(proc, 150)
    elapsed = time.time() - t0
    assert proc.returncode == 0, out[-4000:]
    assert "exitcode: 13" in out, out[-4000:]  # the agent saw the crash, then restarted the ranks
    assert elapsed < 110, elapsed  # two start-ups + 10 steps; a peer waiting out the 60 s timeout would exceed it
    resumes = train_records(run_dir, "resume")
    assert [r["step"] for r in resumes] == [6], (resumes, out[-4000:])  # step 6 was the last checkpoint
    steps = [r["step"] for r in train_records(run_dir)]
    assert steps[:7] == [1, 2, 3, 4, 5, 6, 7] and steps[-4:] == [7, 8, 9, 10], steps


def r_step(flagged: list[dict]) -> int:
    return flagged[0]["step"]


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", ["step", "data"])
def test_straggler_rank_is_flagged_with_host_and_data_vs_compute_split(prepared_demo, tmp_path, where):
    """Row 17: rank 1 sleeps 0.4 s per step, in its step or in its data pipeline. After
    straggler_windows log windows rank 0 names it, its host and which side its time goes to."""
    from stunet_scale.parallel.distributed import hostname

    run_dir = tmp_path / "run"
    fault = {"step_sleep": {"rank": 1, "seconds": 0.4}} if where == "step" else {"data_sleep": {"rank": 1, "seconds": 0.2}}
    proc = start_trainer(2, run_dir, prepared_demo, "distributed.backend=ddp", "distributed.timeout_s=60",
                         "schedule.max_steps=8", "checkpoint.every_steps=100", "tracking.log_every_steps=2",
                         "tracking.straggler_windows=2", faults=fault)
    out = finish(proc, 120)
    assert proc.returncode == 0, out[-4000:]
    flagged = train_records(run_dir, "straggler")
    # flagged once, after 2 slow windows of 2 steps (the first window may not count: first-step warm-up)
    assert [(r["rank"], r["host"]) for r in flagged] == [(1, hostname())] and r_step(flagged) in (4, 6), (flagged, out[-3000:])
    r = flagged[0]
    if where == "step":
        assert r["compute_s"] > 0.35 and r["data_wait_s"] < r["compute_s"]
        assert "(mostly compute)" in out
    else:
        assert r["data_wait_s"] > 0.15 and r["data_wait_s"] > r["compute_s"]  # one micro-batch per rank and step
        assert "(mostly its data pipeline)" in out
    assert f"straggler: rank 1 on {hostname()}" in out
