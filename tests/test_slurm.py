"""slurm/*.sh under a real Slurm: preemption signal, checkpoint, requeue, resume, chain mode, arrays.

The cluster is real (munged + slurmctld + two slurmd "nodes" on this host, tests/slurm/
local_cluster.py); so are sbatch, srun, scancel and scontrol requeue. Where the host cannot run
it (Slurm not installed, not root) the cluster tests skip with the reason; the static checks
(shellcheck, exit-code coupling, refusal outside Slurm) run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from local_cluster import ClusterUnavailable, LocalSlurm, unavailable_reason

SCRIPTS = [REPO / "slurm" / "submit_pretrain.sh", REPO / "slurm" / "submit_prepare.sh"]
PRETRAIN = SCRIPTS[0]
PREPARE = SCRIPTS[1]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


# ---------------------------------------------------------------------------------------------
# Static checks (no cluster)
# ---------------------------------------------------------------------------------------------


# Every shell script users or CI run, not only the Slurm ones (the issue asks for shellcheck clean).
SHELL_SCRIPTS = [*SCRIPTS, REPO / "launch" / "quickstart.sh", REPO / "launch" / "install.sh", REPO / ".ci" / "run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (`.ci/run` installs Debian's shellcheck when it runs as root with apt-get)")
    out = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_requeue_code_is_read_from_the_trainer():
    # The script asks the trainer for its constant instead of repeating the number.
    from stunet_scale.train import EXIT_REQUEUE

    text = PRETRAIN.read_text()
    assert "from stunet_scale.train import EXIT_REQUEUE" in text
    assert not re.search(r"EXIT_REQUEUE=\d", text)
    assert EXIT_REQUEUE == 75


def test_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(PRETRAIN), "configs/debug.yaml"], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 2 and "sbatch" in out.stderr
    out = subprocess.run(["bash", str(PRETRAIN)], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 2 and "usage" in out.stderr


def test_sbatch_header_has_the_preemption_contract():
    head = [line for line in PRETRAIN.read_text().splitlines() if line.startswith("#SBATCH")]
    flags = " ".join(head)
    for flag in ("--signal=USR1@", "--requeue", "--open-mode=append", "--ntasks-per-node=1"):
        assert flag in flags
    text = PRETRAIN.read_text()
    assert "PET_SIGNALS_TO_HANDLE" in text and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in text
    assert "--deepspeed_multinode_launcher standard" in text
    lead = int(re.search(r"--signal=USR1@(\d+)", flags).group(1))
    shutdown = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", text).group(1))
    assert shutdown < lead  # the launcher must give up before Slurm's hard kill


def _stub_bin(tmp_path) -> Path:
    """Stand-ins for python, sbatch and scontrol that record their arguments, so the scripts' own
    logic (slice index and count, what gets submitted) runs here without Slurm or a dataset."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    stubs = {
        "fake-python": f'echo "python $*" >>"{calls}"\n',
        "sbatch": f'echo "sbatch STUNET_PREPARE_SHARDS=${{STUNET_PREPARE_SHARDS:-}} ROLE=${{STUNET_PREPARE_ROLE:-}} $*" >>"{calls}"\n'
                  'echo 4242\n',
        "scontrol": f'echo "scontrol $*" >>"{calls}"\necho "JobId=1 Command={PREPARE} Other=x"\n',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run_prepare(tmp_path, args, **slurm_env):
    bin_dir = tmp_path / "bin" if (tmp_path / "bin").exists() else _stub_bin(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "STUNET_"))}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", STUNET_PYTHON=str(bin_dir / "fake-python"))
    env.update({k: str(v) for k, v in slurm_env.items()})
    calls = tmp_path / "calls.log"
    calls.unlink(missing_ok=True)
    out = subprocess.run(["bash", str(PREPARE), "SRC", "OUT", *args], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    return out, (calls.read_text().splitlines() if calls.exists() else [])


def _array_task(task, ids, array_job=77):
    return {"SLURM_JOB_ID": 100 + task, "SLURM_ARRAY_JOB_ID": array_job, "SLURM_ARRAY_TASK_ID": task,
            "SLURM_ARRAY_TASK_MIN": min(ids), "SLURM_ARRAY_TASK_MAX": max(ids), "SLURM_ARRAY_TASK_COUNT": len(ids)}


@pytest.mark.parametrize("task", [3, 7])
def test_prepare_retry_of_some_tasks_prepares_the_same_slices(tmp_path, task):
    # The documented retry of failed tasks 3 and 7 of 16: each must redo its own slice of 16, not
    # slice (id - lowest id) of 2.
    out, calls = _run_prepare(tmp_path, ["--num-shards", "16", "--", "--classes", "stunet"], **_array_task(task, [3, 7]))
    assert out.returncode == 0, out.stderr
    prepare = [c for c in calls if c.startswith("python ")]
    assert prepare == [f"python -m stunet_scale prepare SRC OUT --shard-index {task} --num-shards 16 --classes stunet"]
    # The lowest task of a hand-submitted array queues the finalize job after this array, once.
    finalize = [c for c in calls if c.startswith("sbatch ")]
    if task == 3:
        assert len(finalize) == 1 and "ROLE=finalize" in finalize[0] and "--dependency=afterok:77" in finalize[0]
    else:
        assert finalize == []


def test_prepare_slice_count_comes_from_the_driver_or_a_whole_array(tmp_path):
    # Array submitted by the login-node path: the count arrives as STUNET_PREPARE_SHARDS (role slice).
    out, calls = _run_prepare(tmp_path, [], STUNET_PREPARE_ROLE="slice", STUNET_PREPARE_SHARDS=4,
                              **_array_task(2, range(4)))
    assert out.returncode == 0, out.stderr
    assert calls == ["python -m stunet_scale prepare SRC OUT --shard-index 2 --num-shards 4"]
    # By hand with nothing given: a whole 0..N-1 array's size is the count.
    out, calls = _run_prepare(tmp_path, [], **_array_task(5, range(8)))
    assert out.returncode == 0, out.stderr
    assert calls == ["python -m stunet_scale prepare SRC OUT --shard-index 5 --num-shards 8"]
    # A partial array with no count would guess wrong: refuse, and say what to pass.
    out, calls = _run_prepare(tmp_path, [], **_array_task(7, [3, 7]))
    assert out.returncode == 2 and "--num-shards N" in out.stderr and calls == []
    # A task id beyond the count is no slice at all.
    out, calls = _run_prepare(tmp_path, ["--num-shards", "4"], **_array_task(5, range(6)))
    assert out.returncode == 2 and "not a slice" in out.stderr and calls == []


def test_prepare_login_node_submits_the_array_and_finalize(tmp_path):
    out, calls = _run_prepare(tmp_path, ["--num-shards", "3", "--", "--format", "wds"])
    assert out.returncode == 0, out.stderr
    array, finalize = calls
    assert "STUNET_PREPARE_SHARDS=3 ROLE=slice" in array and "--array=0-2" in array
    assert "ROLE=finalize" in finalize and "--dependency=afterok:4242" in finalize and finalize.endswith("--format wds")


def test_pretrain_refuses_a_torch_that_cannot_forward_the_preemption_signal(tmp_path):
    # A torch whose torchrun lacks --signals-to-handle ignores PET_SIGNALS_TO_HANDLE; SIGUSR1 would
    # then kill the launchers. The script must stop before queueing or starting anything.
    old_torch = tmp_path / "old-python"
    old_torch.write_text(f'#!/bin/sh\n[ "$*" = "-m torch.distributed.run --help" ] && '
                         f'{{ echo "usage: torchrun [-h] [--nnodes NNODES] [--nproc-per-node NPROC]"; exit 0; }}\n'
                         f'exec {sys.executable} "$@"\n')
    old_torch.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "STUNET_"))}
    env.update(SLURM_JOB_ID="123", STUNET_PYTHON=str(old_torch), STUNET_CHAIN="1", PATH=f"{_stub_bin(tmp_path)}:{env['PATH']}")
    out = subprocess.run(["bash", str(PRETRAIN), "configs/debug.yaml"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "has no torchrun --signals-to-handle" in out.stderr and "upgrade torch" in out.stderr
    assert not (tmp_path / "calls.log").exists()  # no follow-up job was queued


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    c = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2, requeue_delay_s=5)
    try:
        c.start()
    except ClusterUnavailable as e:
        # Slurm installed and root (unavailable_reason() was None): in CI (.ci/run installs Slurm
        # exactly so these run) a start-up failure is a broken setup, not a reason to go green.
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI: Slurm is installed and we are root, but the local cluster did not start: {e}")
        pytest.skip(f"could not start a local Slurm cluster here: {e}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from stunet_scale.data.ingest.demo import write_demo_dataset
    from stunet_scale.data.ingest.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root / "raw", cases=4, seed=0)
    result = prepare_dataset(root / "raw", root / "store", classes="stunet", format="zarr")
    assert result["exit_code"] == 0
    return root / "store"


def _job_env(cluster, **extra) -> dict:
    env = cluster.env({
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "STUNET_PYTHON": sys.executable,
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "slurm")]),
        "OMP_NUM_THREADS": "1",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _sbatch_pretrain(cluster, tmp, env, overrides, nodes=2) -> tuple[str, Path]:
    log = tmp / "slurm-%j.out"
    job = cluster.sbatch([f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
                          "--job-name=stunet-test", str(PRETRAIN), "configs/debug.yaml", *overrides],
                         env=env, cwd=REPO)
    return job, Path(str(log).replace("%j", job))


def _wait_for_file(path: Path, predicate, cluster, job, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                if predicate(path):
                    return
            except (ValueError, OSError):
                pass
        state = cluster.job(job).get("JobState")
        if state in TERMINAL:
            break
        time.sleep(0.5)
    raise AssertionError(f"{path} never satisfied the condition (job {job}: {cluster.job(job).get('JobState')})\n"
                         f"{cluster.log_tail()}")


def _finished(expect_restarts: int):
    return lambda s: s.get("JobState") in TERMINAL and (s.get("JobState") != "COMPLETED" or s.get("Restarts") == str(expect_restarts))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Stand-in workload: the mechanics, fast (chain mode + accelerate launch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_chain_mode_hands_over_to_a_singleton_follow_up(cluster, tmp_path):
    """Clusters without requeue: each job queues its successor with --dependency=singleton."""
    run = tmp_path / "run"
    env = _job_env(cluster, STUNET_TRAIN_MODULE="standin_trainer", STUNET_LAUNCHER="accelerate", STUNET_CHAIN=1,
                   STUNET_DRY_RUN=0)
    first, first_log = _sbatch_pretrain(cluster, tmp_path, env, [
        f"run_dir={run}", "distributed.backend=deepspeed", "schedule.micro_batch=1", "schedule.max_steps=12"])
    _wait_for_file(run / "standin" / "progress", lambda p: int(p.read_text()) >= 2, cluster, first, 120)
    # Signal only the batch shell (as --signal=B:USR1@... would): it must forward it to the ranks.
    cluster.run("scancel", "--batch", "--signal=USR1", first)
    info = cluster.wait(first, lambda s: s.get("JobState") in TERMINAL, 120, "first link ends")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", first_log.read_text()
    text = first_log.read_text()
    assert "batch shell got SIGUSR1: forwarding it to the job steps" in text
    follow = re.search(r"follow-up job (\d+) queued", text).group(1)
    assert "follow-up " + follow + " continues the run" in text
    info = cluster.wait(follow, lambda s: s.get("JobState") in TERMINAL, 180, "second link ends")
    text = first_log.read_text()  # every link of a chain appends to the first link's log
    assert info["JobState"] == "COMPLETED", text[-3000:]
    events = _jsonl(run / "standin" / "events.jsonl")
    kinds = [(e["kind"], e["job"]) for e in events]
    assert kinds == [("start", first), ("preempted", first), ("start", follow), ("finished", follow)], events
    assert events[2]["step"] == events[1]["step"] >= 2  # resumed exactly where the first link saved
    assert len({e["run_id"] for e in events}) == 1
    # The second link queued a third at its start and cancelled it once training finished.
    third = re.findall(r"follow-up job (\d+) queued", text)[1]
    assert cluster.job(third).get("JobState") == "CANCELLED"
    assert "--use_deepspeed --deepspeed_multinode_launcher standard" in (run / "slurm" / "allocations.log").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_failures_are_neither_requeued_nor_chained(cluster, tmp_path):
    # A rank that crashes (no preemption signal): the job fails once, no requeue.
    run = tmp_path / "crash"
    env = _job_env(cluster, STUNET_TRAIN_MODULE="standin_trainer", STUNET_LAUNCHER="torchrun", STUNET_DRY_RUN=0,
                   STANDIN_CRASH_AT_STEP=2)
    job, log = _sbatch_pretrain(cluster, tmp_path, env, [f"run_dir={run}", "distributed.backend=ddp",
                                                         "schedule.micro_batch=1", "schedule.max_steps=12"])
    info = cluster.wait(job, lambda s: s.get("JobState") in TERMINAL, 120, "crashed job ends")
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-3000:]
    assert "not a preemption); not requeueing" in text and "stand-in crash at step 2" in text
    # A bad config in chain mode: fails before any rank starts and cancels the follow-up it queued.
    env = _job_env(cluster, STUNET_TRAIN_MODULE="standin_trainer", STUNET_CHAIN=1)
    job, log = _sbatch_pretrain(cluster, tmp_path, env, [f"run_dir={tmp_path / 'bad'}", "optim.lrr=0.1"])
    info = cluster.wait(job, lambda s: s.get("JobState") in TERMINAL, 60, "bad-config job ends")
    text = log.read_text()
    assert info["JobState"] == "FAILED", text
    assert "unknown config key 'optim.lrr'; did you mean 'optim.lr'?" in text
    follow = re.search(r"follow-up job (\d+) queued", text).group(1)
    assert f"chain: cancelled follow-up {follow}" in text
    assert cluster.wait(follow, lambda s: s.get("JobState") in TERMINAL, 30)["JobState"] == "CANCELLED"


# ---------------------------------------------------------------------------------------------
# The real trainer on demo data: preempt, requeue, resume, finish
# ---------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_pretrain_preempted_requeued_and_resumed(cluster, demo_store, tmp_path):
    run = tmp_path / "run"
    steps = 16
    env = _job_env(cluster, STUNET_LAUNCHER="torchrun")
    job, log = _sbatch_pretrain(cluster, tmp_path, env, [
        f"run_dir={run}", f"data.root={demo_store}", "distributed.backend=deepspeed", "distributed.zero_stage=3",
        "schedule.micro_batch=1", f"schedule.max_steps={steps}", "validation.enabled=false",
        "checkpoint.every_steps=1000", "tracking.log_every_steps=1"])

    def trained(k):
        return lambda p: sum(1 for r in _jsonl(p) if r.get("kind", "train") == "train" and "loss" in r) >= k

    _wait_for_file(run / "metrics.jsonl", trained(3), cluster, job, 240)
    cluster.run("scancel", "--signal=USR1", job)  # what Slurm sends before the time limit
    info = cluster.wait(job, _finished(1), 420, "requeued job finishes")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]

    # First allocation: the signal reached every rank, one checkpoint, exit with the requeue code.
    m = re.search(r"preemption \(SIGUSR1\): checkpoint at step (\d+) is committed", text)
    assert m, text[-4000:]
    preempt_step = int(m.group(1))
    assert 3 <= preempt_step < steps
    assert f"requeueing job {job}" in text
    assert (run / "slurm" / f"preempted.{job}.0.node0").exists() and (run / "slurm" / f"preempted.{job}.0.node1").exists()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert f"step_{preempt_step:09d}" in ckpts and f"step_{steps:09d}" in ckpts, ckpts

    # Second allocation: resumed from that checkpoint, into the same MLflow run, and finished.
    assert re.search(rf"resumed from \S*step_{preempt_step:09d} at step {preempt_step}\b", text), text[-4000:]
    assert "training finished (allocation 1)" in text
    run_ids = re.findall(r"MLflow: (?:continuing )?run ([0-9a-f]{32})", text)
    assert len(run_ids) == 2 and run_ids[0] == run_ids[1], run_ids
    with sqlite3.connect(run / "mlflow.db") as db:
        assert [r[0] for r in db.execute("select run_uuid from runs")] == [run_ids[0]]
        logged = {r[0] for r in db.execute("select step from metrics where key like '%loss%'")}
    assert min(logged) <= preempt_step < max(logged) == steps
    assert not (run / "REQUEUE").exists()  # removed when the run finished

    # The record of what ran: one header per allocation, each node's exact command.
    record = (run / "slurm" / "allocations.log").read_text()
    assert record.count(f"job {job} allocation ") == 2
    assert len(re.findall(r"^# node [01] ", record, re.M)) == 4
    assert "--node_rank 0" in record and "--node_rank 1" in record and "is_host=1" in record
    launches = _jsonl(run / "launches.jsonl")
    assert [r["restart_count"] for r in launches] == [None, "1"] or [r["restart_count"] for r in launches] == ["0", "1"]
    assert all(r["slurm_job_id"] == job and r["command"].startswith("srun ") for r in launches)
    assert (run / "config.yaml").exists() and (run / "git_revision.txt").exists()


# ---------------------------------------------------------------------------------------------
# submit_prepare.sh: job array over case slices, then a dependent --finalize job
# ---------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_prepare_array_then_finalize(cluster, tmp_path):
    from stunet_scale.data.ingest.demo import write_demo_dataset

    raw = write_demo_dataset(tmp_path / "raw", cases=3, seed=1)
    out = tmp_path / "store"
    env = _job_env(cluster, STUNET_PREPARE_SBATCH_ARGS="--cpus-per-task=1 --mem-per-cpu=200M")
    proc = subprocess.run(["bash", str(PREPARE), str(raw), str(out), "--num-shards", "2", "--",
                           "--classes", "stunet", "--format", "both", "--cases-per-shard", "1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ids = dict(re.findall(r"^(array|finalize) job (\d+)", proc.stdout, re.M))
    array, final = ids["array"], ids["finalize"]
    # While it waits, the finalize job is held by an afterok dependency on the whole array (Slurm
    # clears the field once it is satisfied, so this is only checkable before the array is done).
    pending = cluster.job(final)
    if pending.get("Reason") == "Dependency":
        assert f"afterok:{array}" in pending.get("Dependency", ""), pending
    info = cluster.wait(final, lambda s: s.get("JobState") in TERMINAL, 240, "finalize ends")
    assert info["JobState"] == "COMPLETED", cluster.log_tail()
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["cases"]) == ["s0001", "s0002", "s0003"]
    # And it did wait: it started only after every array task had ended (ISO times compare as text).
    ends = []
    for task in (0, 1):
        task_info = cluster.job(f"{array}_{task}")
        assert task_info.get("JobState") == "COMPLETED"
        ends.append(task_info["EndTime"])
    assert info["StartTime"] >= max(ends), (info["StartTime"], ends)
