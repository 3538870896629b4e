"""The trainer in one process: resume semantics, exit codes, MLflow, and kills during a save.

In-process runs use the synthetic stream (tests/synthetic_data.py) and a 3-stage STU-Net on 16^3
patches, so each takes a second or two; kill tests run the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synthetic_data
from conftest import REPO

from stunet_scale.train import EXIT_CONFIG, EXIT_NO_VALID_CHECKPOINT, EXIT_OK, EXIT_REQUEUE, main

TINY = ["model.size=null", "model.base_width=4", "model.blocks_per_stage=1", "model.num_classes=3",
        "model.width_multipliers=[1,2,4]", "model.pool_strides=[[2,2,2],[2,2,2]]",
        "model.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3]]", "loss.deep_supervision_weights=[0.67,0.33]",
        "data.patch_size=[16,16,16]", "distributed.backend=none", "distributed.precision=fp32",
        "schedule.samples_per_epoch=8", "tracking.log_every_steps=1", "validation.enabled=false",
        "tracking.enabled=false", "checkpoint.every_steps=2"]


def run(tmp_path, *overrides):
    return main(["--config", str(REPO / "configs" / "debug.yaml"), f"run_dir={tmp_path}", *TINY, *overrides],
                data=synthetic_data.SyntheticDataSource)


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_resume_auto_continues_and_a_finished_run_has_nothing_to_do(tmp_path):
    assert run(tmp_path, "schedule.max_steps=3") == EXIT_OK
    assert run(tmp_path, "schedule.max_steps=5") == EXIT_OK
    steps = [r["step"] for r in train_records(tmp_path)]
    assert steps == [1, 2, 3, 4, 5]
    resume = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"resume"' in x]
    assert resume[0]["step"] == 3 and resume[0]["mode"] == "portable"
    assert run(tmp_path, "schedule.max_steps=5") == EXIT_OK  # same command again: already done
    assert [r["step"] for r in train_records(tmp_path)] == steps
    # the run dir documents itself for schedulers and humans
    for name in ("config.yaml", "git_revision.txt", "launch_command.txt", "launches.jsonl", "plots/progress.png"):
        assert (tmp_path / name).is_file(), name
    assert len((tmp_path / "launches.jsonl").read_text().splitlines()) == 3


def test_exact_resume_single_process(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, "schedule.max_steps=6") == EXIT_OK
    assert run(b, "schedule.max_steps=3") == EXIT_OK and run(b, "schedule.max_steps=6") == EXIT_OK
    assert [r["loss"] for r in train_records(a)] == [r["loss"] for r in train_records(b)]


def test_exit_codes_for_bad_config_and_checkpoint_states(tmp_path, caplog):
    assert run(tmp_path, "optim.lrr=1") == EXIT_CONFIG
    assert run(tmp_path, "schedule.max_steps=2") == EXIT_OK
    assert run(tmp_path, "checkpoint.resume=never") == EXIT_CONFIG  # would overwrite an existing run
    for ckpt in (tmp_path / "checkpoints").glob("step_*"):
        (ckpt / "trainer_state.json").write_text("{}")  # manifest no longer matches
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path, "schedule.max_steps=4") == EXIT_NO_VALID_CHECKPOINT
    assert "none is valid" in caplog.text
    assert run(tmp_path / "other", f"checkpoint.resume={tmp_path / 'nope'}") == EXIT_NO_VALID_CHECKPOINT


def test_mlflow_sqlite_default_and_resumed_run_continues(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    assert run(tmp_path, "tracking.enabled=true", "schedule.max_steps=2") == EXIT_OK
    assert run(tmp_path, "tracking.enabled=true", "schedule.max_steps=4") == EXIT_OK
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stunet-debug").experiment_id])
    assert len(runs) == 1, "a resumed job must continue the same MLflow run"
    r = runs[0]
    assert r.data.params["optim.lr"] == "0.01" and r.data.params["distributed.backend"] == "none"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2, 3, 4]
    for key in ("lr", "grad_norm", "patches_per_s", "tflops_per_gpu", "data_wait_frac"):
        assert key in r.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config", "plots"} <= artifacts
    assert r.info.status == "FINISHED" and r.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def _mlflow_run(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stunet-debug").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_signal_at_the_last_step_finishes_the_run(tmp_path, monkeypatch):
    """Preempted during the final step: the final checkpoint is saved and the run finishes (exit 0).

    A requeue would find nothing left to train; the final validation and closing the MLflow run
    must not be left to it.
    """
    pytest.importorskip("mlflow")
    monkeypatch.setenv("STUNET_FAULTS", json.dumps({"signal": {"rank": 0, "step": 2, "name": "SIGUSR1"}}))
    assert run(tmp_path, "schedule.max_steps=3", "validation.enabled=true", "tracking.enabled=true") == EXIT_OK
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3]
    assert [r["step"] for r in _records(tmp_path, "val")] == [3]
    assert not _records(tmp_path, "preempted") and not (tmp_path / "REQUEUE").exists()
    assert (tmp_path / "checkpoints" / "step_000000003" / "COMMITTED").is_file()
    _, r = _mlflow_run(tmp_path)
    assert r.info.status == "FINISHED"


def test_rerun_of_a_run_at_its_last_step_completes_validation_and_tracking(tmp_path):
    """A run whose last checkpoint exists but whose ending did not run (killed in its final
    validation, or preempted at its last step by an older version) is completed by a rerun: no
    training, the missing final validation once, the MLflow run closed."""
    pytest.importorskip("mlflow")
    assert run(tmp_path, "schedule.max_steps=3", "tracking.enabled=true") == EXIT_OK  # validation off
    client, r = _mlflow_run(tmp_path)
    client.update_run(r.info.run_id, status="RUNNING")  # as a job killed before RunReport.finished leaves it
    for _ in range(2):  # the second rerun finds the validation done and adds nothing
        assert run(tmp_path, "schedule.max_steps=3", "validation.enabled=true", "tracking.enabled=true") == EXIT_OK
        assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3]
        assert [r["step"] for r in _records(tmp_path, "val")] == [3]
        assert _mlflow_run(tmp_path)[1].info.status == "FINISHED"


def test_unreachable_tracking_server_warns_and_training_continues(tmp_path, caplog):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with caplog.at_level(logging.WARNING):
        rc = run(tmp_path, "tracking.enabled=true", f"tracking.mlflow_uri=http://127.0.0.1:{port}", "schedule.max_steps=3")
    assert rc == EXIT_OK and len(train_records(tmp_path)) == 3
    assert "unreachable" in caplog.text


# ---- kills and signals around a save: the real CLI in a subprocess ---------------------------


def _cli(tmp_path, *overrides, faults=None):
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}:{REPO}", OMP_NUM_THREADS="1")
    if faults:
        env["STUNET_FAULTS"] = json.dumps(faults)
    cmd = [sys.executable, str(REPO / "tests" / "train_harness.py"), "--config", str(REPO / "configs" / "debug.yaml"),
           f"run_dir={tmp_path}", *TINY, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, timeout=120):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    """Reliability checks row 1 (README): a half-written step_N.tmp is never loaded and is removed at the next start."""
    p = _cli(tmp_path, "schedule.max_steps=6", faults={"slow_save_s": 30})
    ckpts = tmp_path / "checkpoints"
    # first save (step 2) sleeps 30 s after its files are written; let it commit? no: kill it mid-save
    _wait_for(lambda: (ckpts / "step_000000002.tmp" / "rng" / "rank_00000.pt").exists())
    p.kill()
    p.wait()
    assert (ckpts / "step_000000002.tmp").is_dir() and not (ckpts / "step_000000002").exists()
    p = _cli(tmp_path, "schedule.max_steps=3")
    out, _ = p.communicate(timeout=240)
    assert p.returncode == EXIT_OK, out
    assert not (ckpts / "step_000000002.tmp").exists() and (ckpts / "step_000000003").is_dir()
    assert "removed unfinished checkpoint" in out
    assert [r["step"] for r in train_records(tmp_path)][-3:] == [1, 2, 3]  # started over: nothing was committed


@pytest.mark.timeout(300)
def test_death_between_manifest_and_marker_is_not_a_checkpoint(tmp_path):
    """Reliability checks rows 2 and 11 (README): no marker -> not valid; a signal during a save lets it finish, once."""
    p = _cli(tmp_path, "schedule.max_steps=2", "checkpoint.every_steps=1")
    assert p.wait(timeout=240) == EXIT_OK
    p = _cli(tmp_path, "schedule.max_steps=4", "checkpoint.every_steps=1", faults={"die_before_marker": True})
    assert p.wait(timeout=240) == 9
    assert not (tmp_path / "checkpoints" / "step_000000003").exists()
    # the resume ignores the markerless tmp dir and continues from step 2; SIGUSR1 mid-save -> one save, exit 75
    stale = tmp_path / "checkpoints" / "step_000000003.tmp"
    assert stale.is_dir()
    p = _cli(tmp_path, "schedule.max_steps=10", "checkpoint.every_steps=1", faults={"slow_save_s": 3})
    _wait_for(lambda: not stale.exists())  # removed at start-up as an unfinished save
    _wait_for(lambda: (stale / "rng" / "rank_00000.pt").exists())  # the new save of step 3, now sleeping
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == EXIT_REQUEUE, out
    steps = sorted(int(d.name[5:]) for d in (tmp_path / "checkpoints").glob("step_*") if d.name[5:].isdigit())
    assert steps[-1] == 3, steps  # the save in flight completed; no second save at the same step
    assert json.loads((tmp_path / "REQUEUE").read_text())["step"] == 3


@pytest.mark.timeout(600)
def test_cli_end_to_end_on_demo_data_with_mlflow_and_validation(prepared_demo, tmp_path):
    """`stunet-scale train` as the quickstart runs it: real store, stream, validation, MLflow, checkpoint."""
    d = tmp_path / "run"
    cmd = [sys.executable, "-m", "stunet_scale", "train", "--config", str(REPO / "configs" / "debug.yaml"),
           f"run_dir={d}", f"data.root={prepared_demo}", "schedule.max_steps=4", "schedule.samples_per_epoch=4",
           "checkpoint.every_steps=4", "tracking.log_every_steps=2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=580,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = done.stdout + done.stderr
    assert done.returncode == EXIT_OK, out[-4000:]
    assert "step 4/4" in out  # one readable line per N steps when stdout is not a TTY
    assert (d / "checkpoints" / "step_000000004" / "COMMITTED").is_file()
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [2, 4]
    assert any(r["kind"] == "val" for r in recs) and any(r["kind"] == "pseudo_dice" for r in recs)
    assert (d / "mlflow.db").is_file() and list((d / "mlartifacts").rglob("progress.png"))
    from stunet_scale.checkpointing import load_consolidated

    ck = load_consolidated(d)
    assert ck.step == 4 and ck.meta["backend"] == "none" and len(ck.state_dict) > 0
