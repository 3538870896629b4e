"""Export after real 2-rank DeepSpeed ZeRO-3 and FSDP2 CPU runs, then fine-tune from an export with the same trainer.

The consolidated weights (read from the portable/ copy every save writes) must equal the backends'
own reconstructions bit for bit (DeepSpeed's ``zero_to_fp32``, torch's ``dcp_to_torch_save``); a ZeRO
checkpoint without our portable copy is refused until its owner converts it with ``--trust-native``,
and every exported format must reload to exactly those tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from stunet_scale.export import export, read_weights
from stunet_scale.export.exporter import reload_all

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

# Every architecture key is given, so the test does not depend on what debug.yaml happens to hold.
TINY = ["model.size=null", "model.base_width=4", "model.blocks_per_stage=1", "model.num_classes=4",
        "model.width_multipliers=[1,2,4,8,16,16]", "model.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3],[3,3,3],[3,3,3],[3,3,3]]",
        "model.pool_strides=[[2,2,2],[2,2,2],[2,2,2],[2,2,2],[1,1,1]]", "data.patch_size=[32,32,32]",
        "loss.deep_supervision_weights=[0.5333,0.2667,0.1333,0.0667,0.0]", "model.in_channels=1",
        "validation.enabled=false", "tracking.enabled=false"]


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _train_2_ranks(run, *backend):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "train_harness.py"), "--config", str(REPO / "configs" / "debug.yaml"),
           f"run_dir={run}", *backend, "schedule.max_steps=2", "schedule.micro_batch=1", "checkpoint.every_steps=2",
           *TINY]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    return _train_2_ranks(tmp_path_factory.mktemp("zero3") / "run", "distributed.backend=deepspeed",
                          "distributed.zero_stage=3")


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    return _train_2_ranks(tmp_path_factory.mktemp("fsdp2") / "run", "distributed.backend=fsdp2")


def _zero_to_fp32(run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = next((run / "checkpoints").glob("step_*"))
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "native"), tag="native")
    return {k.removeprefix("module."): v.float() for k, v in reference.items()}


def _assert_export_equals(run, out, reference):
    source = read_weights(run)
    assert source.format == "training-checkpoint"
    assert set(reference) == set(source.state_dict)
    assert all(torch.equal(source.state_dict[k], v) for k, v in reference.items())
    # every export holds the release's (z, y, x) convention: the trained tensors, kernels reversed
    from stunet_scale.export.axes import TRANSFER_AXIS_ORDER, to_axis_order

    expected, _ = to_axis_order(dict(reference), source.spec, TRANSFER_AXIS_ORDER)
    for rel, loaded in reload_all(out).items():
        assert set(loaded) == set(reference), rel
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), rel


def test_export_after_zero3_is_bit_exact(zero3_run, tmp_path):
    result = export(zero3_run, tmp_path / "export", log=lambda *a: None)
    reference = _zero_to_fp32(zero3_run)
    _assert_export_equals(zero3_run, result.out, reference)
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


def test_zero3_checkpoint_without_portable_copy_is_refused_until_converted_knowingly(zero3_run, tmp_path):
    from stunet_scale.checkpointing.commit import MANIFEST, verify
    from stunet_scale.checkpointing.trust_native import add_portable_copy
    from stunet_scale.export.checkpoint_io import CheckpointError

    # What an older version committed with checkpoint.portable_copy=false: the same checkpoint minus
    # portable/ (and minus portable/ in the commit manifest, so the checkpoint still verifies).
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    ckpt = next((run / "checkpoints").glob("step_*"))
    shutil.rmtree(ckpt / "portable")
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("portable/")}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    # DeepSpeed's *_states.pt are pickles: export never opens them...
    with pytest.raises(CheckpointError, match="no portable/ copy.*trust_native --trust-native"):
        export(run, tmp_path / "refused", log=lambda *a: None)
    # ...until the owner of the run converts it, knowingly, through DeepSpeed's zero_to_fp32.
    add_portable_copy(run, trust_native=True)
    assert verify(ckpt) == (True, "")
    result = export(run, tmp_path / "export", log=lambda *a: None)
    _assert_export_equals(run, result.out, _zero_to_fp32(zero3_run))


def test_export_after_fsdp2_is_bit_exact_with_dcp_to_torch_save(fsdp2_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from stunet_scale.checkpointing.consolidated import clean_key

    ckpt = next((fsdp2_run / "checkpoints").glob("step_*"))
    dcp_to_torch_save(ckpt / "native", tmp_path / "dcp.pth")
    full = torch.load(tmp_path / "dcp.pth", weights_only=True)
    # DCP holds {"model": {fqn: tensor}, "optim": ...}; older layouts flatten it to "model.<fqn>".
    model = full["model"] if isinstance(full.get("model"), dict) else {
        k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
    reference = {clean_key(k): v.float() for k, v in model.items()}
    assert reference and not any(k.startswith("optim") for k in reference)
    # FSDP2 saves write portable/ too, and export reads only that (DCP's .metadata is a pickle).
    from stunet_scale.checkpointing import load_consolidated

    assert (ckpt / "portable" / "index.json").is_file() and load_consolidated(fsdp2_run).meta["source"] == "portable"
    result = export(fsdp2_run, tmp_path / "export", formats=["stunet", "safetensors"], log=lambda *a: None)
    _assert_export_equals(fsdp2_run, result.out, reference)
    config = json.loads((result.out / "hf" / "config.json").read_text())
    assert config["training"]["world_size"] == 2 and config["training"]["backend"] == "fsdp2"
