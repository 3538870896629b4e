"""Launch-environment detection, the DeepSpeed config we build, param groups, validation forward padding."""

from __future__ import annotations

import pytest
import torch

from stunet_scale.config import ConfigError, load_config
from stunet_scale.models import build_stunet, count_parameters
from stunet_scale.parallel.backend import param_groups
from stunet_scale.parallel.deepspeed_engine import build_ds_config, zero_defaults
from stunet_scale.parallel.distributed import DistEnv, detect_launch_env, first_host
from stunet_scale.parallel.wrap import build_backend
from stunet_scale.train.validate import confusion_counts, dice_from_counts, forward_plan


def test_launch_env_torchrun_accelerate_slurm_single():
    tr = detect_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (tr["rank"], tr["world_size"], tr["local_rank"], tr["launcher"]) == (3, 8, 3, "torchrun")
    acc = detect_launch_env({"RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"})
    assert acc["launcher"] == "accelerate"
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_JOB_NODELIST": "gpu[003-004,010]", "SLURM_JOB_ID": "4242"}
    s = detect_launch_env(slurm)
    assert (s["rank"], s["world_size"], s["local_rank"], s["master_addr"], s["launcher"]) == (5, 16, 1, "gpu003", "slurm")
    assert s["master_port"] == 20000 + 4242
    # inside an allocation but not in a job step (plain python in an salloc shell): one process
    batch_shell = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}
    assert detect_launch_env(batch_shell)["world_size"] == 1
    assert detect_launch_env({})["launcher"] == "single"


@pytest.mark.parametrize("nodes,first", [("a1", "a1"), ("gpu[07-09]", "gpu07"), ("x[1,3],y2", "x1"), ("n-[5-6].ib", "n-5.ib")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def _cfg(*o):
    return load_config(None, ["model.size=H", *o])


def test_zero3_defaults_fit_stunet_h():
    largest = max(p.numel() for p in _meta_params("H"))
    assert largest == 127_401_984  # decoder 3072->1536 3^3 conv
    z = zero_defaults(3, largest)
    assert z["stage3_prefetch_bucket_size"] == 160_000_000 >= largest  # prefetch reaches past the biggest tensor
    assert z["reduce_bucket_size"] == 160_000_000 and z["stage3_param_persistence_threshold"] == 100_000
    assert zero_defaults(3, 1000)["stage3_prefetch_bucket_size"] == 50_000_000
    assert "stage3_prefetch_bucket_size" not in zero_defaults(2, largest) and zero_defaults(2, 1)["overlap_comm"]


def _meta_params(size):
    with torch.device("meta"):
        return list(build_stunet(size).parameters())


def test_ds_config_run_config_owns_batch_clip_precision_stage():
    cfg = _cfg("distributed.zero_stage=3", "schedule.global_batch=16", "schedule.micro_batch=1")
    warnings = []
    user = {"train_batch_size": 99, "gradient_clipping": "auto", "bf16": {"enabled": True}, "_comment": "x",
            "zero_optimization": {"stage": 2, "stage3_param_persistence_threshold": 1_000_000}}
    ds = build_ds_config(cfg, 8, 2, 127_401_984, user, warn=warnings.append)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 12.0
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 1_000_000  # a JSON knob is kept
    assert ds["zero_allow_untested_optimizer"] and "_comment" not in ds
    assert warnings and "zero_optimization.stage=2" in warnings[0] and "train_batch_size=99" in warnings[0]


def test_ds_config_rejects_auto_buckets_and_json_optimizer():
    cfg = _cfg()
    with pytest.raises(ConfigError, match="stage3_prefetch_bucket_size"):
        build_ds_config(cfg, 8, 1, 10, {"zero_optimization": {"stage3_prefetch_bucket_size": "auto"}})
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config(cfg, 8, 1, 10, {"optimizer": {"type": "Adam"}})
    off = build_ds_config(_cfg("distributed.offload_optimizer=true", "distributed.precision=fp32"), 8, 1, 10)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and "torch_autocast" not in off


def test_backbone_lr_scale_makes_two_groups_heads_at_full_lr():
    model = build_stunet("S")
    groups, scales = param_groups(model, 0.01, 0.1)
    assert scales == [0.1, 1.0] and groups[0]["lr"] == pytest.approx(0.001) and groups[1]["lr"] == 0.01
    heads = {id(p) for n, p in model.named_parameters() if n.startswith("seg_outputs.")}
    assert {id(p) for p in groups[1]["params"]} == heads
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters("S")
    assert len(param_groups(model, 0.01, 1.0)[0]) == 1


def test_torch_backend_options_bf16_channels_last_stage_checkpointing():
    cfg = load_config(None, ["model.size=null", "model.base_width=2", "model.blocks_per_stage=1", "model.num_classes=3",
                             "model.width_multipliers=[1,2,4]", "model.pool_strides=[[2,2,2],[2,2,2]]",
                             "model.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3]]", "loss.deep_supervision_weights=[0.6,0.4]",
                             "data.patch_size=[16,16,16]", "distributed.backend=none", "distributed.precision=bf16",
                             "distributed.channels_last=true", "distributed.activation_checkpointing=stage",
                             "optim.backbone_lr_scale=0.5"])
    b = build_backend(build_stunet(cfg.model), cfg, DistEnv(), grad_accumulation=2)
    b.set_lr(0.02)
    assert [g["lr"] for g in b.param_groups] == [0.01, 0.02]
    before = [p.detach().clone() for p in b.module.parameters()]
    for last in (False, True):
        with b.accumulate(last):
            out = b.forward(torch.randn(1, 1, 16, 16, 16))
            assert out[0].dtype == torch.bfloat16
            b.backward(sum(o.float().square().mean() for o in out))
    norm, reason = b.step()
    assert reason is None and norm > 0
    assert all(p.dtype == torch.float32 for p in b.module.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, b.module.parameters()))


def test_validation_forward_padding_plan():
    # 3 cases over 2 ranks + an empty rank: everyone ends at the same number of forwards
    plans = forward_plan([[8, 27], [64], []])
    assert plans == [[0, 64 - 8], [64], [64]]  # min_forwards per case: only the last case of a rank pads
    assert forward_plan([[], []]) == [[1], [1]]


def test_dice_from_confusion_counts():
    label = torch.tensor([0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 2, 2, 2, 0])
    counts = confusion_counts(label, pred, 4)
    d = dice_from_counts(counts)
    assert d[1].item() == pytest.approx(2 / 3) and d[2].item() == pytest.approx(4 / 6)
    assert torch.isnan(d[3])  # absent from both: left out of the mean, not counted as 0 or 1


def test_cudnn_check_is_skipped_on_cpu():
    from stunet_scale.parallel.distributed import check_cudnn_conv3d

    assert "skipped" in check_cudnn_conv3d(torch.device("cpu"))


@pytest.mark.gpu
def test_cudnn_runs_bf16_conv3d_on_this_gpu():
    from stunet_scale.parallel.distributed import check_cudnn_conv3d

    assert "runs on cuDNN" in check_cudnn_conv3d(torch.device("cuda"))
