"""Every exit is a clean exit (issue 13, item 4).

* Checks that can run before the process group, backend and MLflow exist run there: a missing data
  root, a class-count mismatch with the prepared store, too little disk for one checkpoint and a
  refused ``checkpoint.init_from`` all exit 2 with the key named, leaving no MLflow run behind.
* Every exit after MLflow started ends its run FINISHED, FAILED or KILLED with the reason.
* Disk full during a save names the path and the bytes, removes the half-written step and exits 74.
* A tracking server that accepts connections and never answers does not hold up training.
* The documented exit code survives ``accelerate launch`` through ``$STUNET_EXIT_CODE_FILE``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO
from test_train_single import run

from stunet_scale.train import EXIT_CONFIG, EXIT_DISK_FULL, EXIT_OK, main

# The real stream on the prepared demo store, but a model small enough for seconds per run.
REAL = ["model.size=null", "model.base_width=4", "model.blocks_per_stage=1", "model.width_multipliers=[1,2,4]",
        "model.pool_strides=[[2,2,2],[2,2,2]]", "model.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3]]",
        "loss.deep_supervision_weights=[0.67,0.33]", "data.patch_size=[16,16,16]", "distributed.backend=none",
        "distributed.precision=fp32", "validation.enabled=false", "data.num_workers=0", "schedule.max_steps=2"]


def real_run(run_dir, *overrides):
    return main(["--config", str(REPO / "configs" / "debug.yaml"), f"run_dir={run_dir}", *REAL, *overrides])


def mlflow_runs(run_dir):
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stunet-debug")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def test_store_problems_exit_2_before_backend_or_mlflow(prepared_demo, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        t0 = time.time()
        assert real_run(tmp_path / "a", f"data.root={tmp_path / 'missing'}", "tracking.enabled=true") == EXIT_CONFIG
        assert time.time() - t0 < 30
    assert "data.root=" in caplog.text and "does not exist" in caplog.text
    assert not (tmp_path / "a").exists()  # no run dir, no MLflow store, no run left RUNNING
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert real_run(tmp_path / "b", f"data.root={prepared_demo}", "model.num_classes=7",
                        "tracking.enabled=true") == EXIT_CONFIG
    assert "set model.num_classes=" in caplog.text
    assert not (tmp_path / "b").exists()


def test_too_little_disk_for_one_checkpoint_exits_2_naming_run_dir(tmp_path, monkeypatch, caplog):
    import shutil

    from stunet_scale.train import preflight

    real_usage = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path / "r", "schedule.max_steps=2") == EXIT_CONFIG
    assert "run_dir=" in caplog.text and "GiB free" in caplog.text and "needs ~" in caplog.text


def test_refused_init_from_exits_2(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path / "a", f"checkpoint.init_from={tmp_path / 'nope.pth'}") == EXIT_CONFIG
    assert "checkpoint.init_from=" in caplog.text and "does not exist" in caplog.text
    bad = tmp_path / "model_final_checkpoint.model"
    bad.write_bytes(b"not a checkpoint at all")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path / "b", f"checkpoint.init_from={bad}") == EXIT_CONFIG
    assert f"checkpoint.init_from={str(bad)!r}" in caplog.text


def test_disk_full_during_a_save_names_path_and_bytes_and_marks_the_run_failed(tmp_path, monkeypatch, caplog):
    from stunet_scale.checkpointing.manager import CheckpointManager

    real_save = CheckpointManager.save

    def save(self, step, *a, **kw):
        if step < 4:
            return real_save(self, step, *a, **kw)
        tmp = self.root / f"step_{step:09d}.tmp"
        tmp.mkdir(parents=True)
        (tmp / "half.safetensors").write_bytes(b"\0" * 1000)
        # what safetensors raises: no errno, no path
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           "\"No space left on device\" }) (os error 28)")

    monkeypatch.setattr(CheckpointManager, "save", save)
    with caplog.at_level(logging.ERROR):
        assert run(tmp_path, "schedule.max_steps=6", "tracking.enabled=true") == EXIT_DISK_FULL
    assert "disk full while writing the checkpoint under" in caplog.text and "bytes" in caplog.text
    assert str(tmp_path / "checkpoints" / "step_000000004.tmp") in caplog.text
    assert not (tmp_path / "checkpoints" / "step_000000004.tmp").exists()
    assert (tmp_path / "checkpoints" / "step_000000002" / "COMMITTED").is_file()  # the resume point
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "disk full" in runs[0].data.tags["end_reason"]


def test_a_crash_after_mlflow_started_marks_the_run_failed(tmp_path, monkeypatch):
    from stunet_scale.train.loop import Trainer

    real_step = Trainer.train_step

    def train_step(self, step, micro_batches):
        if step == 2:
            raise RuntimeError("injected crash in step 2")
        return real_step(self, step, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(RuntimeError, match="injected crash"):
        run(tmp_path, "schedule.max_steps=4", "tracking.enabled=true")
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "injected crash in step 2" in runs[0].data.tags["end_reason"]
    # and the same run finishes as FINISHED when resumed without the fault
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert run(tmp_path, "schedule.max_steps=4", "tracking.enabled=true") == EXIT_OK
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_a_tracking_server_that_never_answers_does_not_hold_up_training(tmp_path, monkeypatch, caplog):
    """Row 25 of the README's Reliability checks: the server accepts the connection, then says nothing."""
    from stunet_scale.tracking import Tracker

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept_and_say_nothing():
        try:
            while True:
                held.append(server.accept())
        except OSError:  # closed at the end of the test
            return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    monkeypatch.setattr(Tracker, "START_TIMEOUT_S", 2.0)
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"
    t0 = time.time()
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, "schedule.max_steps=4", "tracking.enabled=true", f"tracking.mlflow_uri={uri}") == EXIT_OK
    assert time.time() - t0 < 30
    assert "did not answer within 2 s" in caplog.text and "continuing without MLflow" in caplog.text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 4  # metrics kept locally
    server.close()


def test_exit_code_survives_accelerate_launch_through_the_exit_code_file(tmp_path):
    """accelerate launch turns a worker's 2 into 1; $STUNET_EXIT_CODE_FILE keeps the 2 (README: Exit codes)."""
    pytest.importorskip("accelerate")
    code_file = tmp_path / "exit_code"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               STUNET_EXIT_CODE_FILE=str(code_file))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--main_process_port",
           str(port), "-m", "stunet_scale.train", "--config", str(REPO / "configs" / "debug.yaml"),
           f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'missing'}", *REAL, "distributed.backend=ddp"]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert code_file.read_text().strip() == str(EXIT_CONFIG), out[-3000:]
    assert "data.root=" in out and time.time() - t0 < 120
    assert not (tmp_path / "run").exists()


def test_the_hang_exit_code_is_one_number():
    from stunet_scale.parallel import distributed
    from stunet_scale.train import EXIT_HANG

    assert EXIT_HANG == distributed.EXIT_HANG == 124
