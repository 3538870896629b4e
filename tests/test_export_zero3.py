"""Export after a real 2-rank DeepSpeed ZeRO-3 CPU run, then fine-tune from that export with the same trainer.

The consolidated weights must equal DeepSpeed's own ``zero_to_fp32`` reconstruction bit for bit, and
every exported format must reload to exactly those tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from stunet_scale.export import export, read_weights
from stunet_scale.export.exporter import reload_all

from conftest import REPO

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

# Every architecture key is given, so the test does not depend on what debug.yaml happens to hold.
TINY = ["model.size=null", "model.base_width=4", "model.blocks_per_stage=1", "model.num_classes=4",
        "model.width_multipliers=[1,2,4,8,16,16]", "model.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3],[3,3,3],[3,3,3],[3,3,3]]",
        "model.pool_strides=[[2,2,2],[2,2,2],[2,2,2],[2,2,2],[1,1,1]]", "data.patch_size=[32,32,32]",
        "loss.deep_supervision_weights=[0.5333,0.2667,0.1333,0.0667,0.0]", "model.in_channels=1",
        "validation.enabled=false", "tracking.enabled=false"]


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("zero3") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "train_harness.py"), "--config", str(REPO / "configs" / "debug.yaml"),
           f"run_dir={run}", "distributed.backend=deepspeed", "distributed.zero_stage=3", "schedule.max_steps=2",
           "schedule.micro_batch=1", "checkpoint.every_steps=2", *TINY]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


def test_export_after_zero3_is_bit_exact(zero3_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    result = export(zero3_run, tmp_path / "export", log=lambda *a: None)
    source = read_weights(zero3_run)
    assert source.format == "training-checkpoint"
    ckpt = next((zero3_run / "checkpoints").glob("step_*"))
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "native"), tag="native")
    reference = {k.removeprefix("module."): v.float() for k, v in reference.items()}
    assert set(reference) == set(source.state_dict)
    assert all(torch.equal(source.state_dict[k], v) for k, v in reference.items())
    for rel, loaded in reload_all(result.out).items():
        assert set(loaded) == set(reference), rel
        assert all(torch.equal(loaded[k], v) for k, v in reference.items()), rel
    config = json.loads((result.out / "hf" / "config.json").read_text())
    assert config["training"]["steps"] == 2 and config["training"]["samples_seen"] == 4
    assert config["spec"]["train_config"]["distributed"]["zero_stage"] == 3
    assert config["training"]["world_size"] == 2 and config["training"]["backend"] == "deepspeed"


def test_finetune_recipe_initialises_from_the_export(zero3_run, tmp_path):
    exported = export(zero3_run, tmp_path / "export", formats=["safetensors"], log=lambda *a: None).out
    run = tmp_path / "ft"
    cmd = [sys.executable, str(REPO / "tests" / "train_harness.py"), "--config",
           str(REPO / "configs" / "finetune" / "example.yaml"), f"run_dir={run}", f"checkpoint.init_from={exported}",
           "distributed.backend=none", "distributed.precision=fp32", "schedule.max_steps=1",
           "optim.backbone_lr_scale=0.1", *TINY, "model.num_classes=3"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (run / "init_from_report.txt").read_text()
    assert "loaded 120 tensors" in report and report.count("head re-initialised (4 -> 3 classes)") == 10
