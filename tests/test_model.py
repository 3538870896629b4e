"""STU-Net module behaviour: shapes, deep supervision, anisotropic strides, init, meta device."""

from __future__ import annotations

import math

import pytest
import torch

from stunet_scale.models import ModelConfig, STUNet, build_stunet

TINY = dict(size=None, base_width=2, blocks_per_stage=1, num_classes=3)


def test_deep_supervision_outputs_full_resolution_first():
    model = build_stunet(ModelConfig(**TINY))
    out = model(torch.randn(1, 1, 64, 64, 64))
    assert [tuple(o.shape[2:]) for o in out] == [(64,) * 3, (32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3]
    assert all(o.shape[:2] == (1, 3) for o in out)


def test_deep_supervision_off_returns_one_tensor_and_nnunet_flag_toggles_it():
    model = build_stunet(ModelConfig(**TINY), deep_supervision=False)
    out = model(torch.randn(1, 1, 64, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 64, 64, 64)
    model.decoder.deep_supervision = True  # what nnU-Net v2's trainer does
    assert isinstance(model(torch.randn(1, 1, 64, 64, 64)), tuple)
    assert model.deep_supervision is True


def test_anisotropic_strides_and_multichannel_input():
    strides = [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [1, 1, 2]]
    cfg = ModelConfig(**TINY, in_channels=2, pool_strides=strides)
    assert cfg.patch_divisor == [16, 16, 8]
    model = build_stunet(cfg)
    out = model(torch.randn(2, 2, 32, 32, 16))
    assert out[0].shape == (2, 3, 32, 32, 16)
    assert out[1].shape == (2, 3, 16, 16, 16)  # first pooling [2,2,1]
    assert model.state_dict()["conv_blocks_context.1.0.conv1.weight"].shape == (4, 2, 3, 3, 3)
    assert model.conv_blocks_context[1][0].conv1.stride == (2, 2, 1)


def test_presets_are_data_not_subclasses():
    for size in "SBLH":
        with torch.device("meta"):
            model = build_stunet(size)
        assert type(model) is STUNet
    widths = {s: ModelConfig(size=s).widths for s in "SBLH"}
    assert widths["H"] == [96, 192, 384, 768, 1536, 1536]
    assert ModelConfig(size="L").resolved().blocks_per_stage == [2] * 6


def test_overrides_through_build_stunet():
    with torch.device("meta"):
        model = build_stunet("B", in_channels=4, num_classes=14, deep_supervision=False)
    assert model.config.in_channels == 4 and model.config.num_classes == 14
    assert model.state_dict()["seg_outputs.4.weight"].shape == (14, 32, 1, 1, 1)
    assert model.state_dict()["conv_blocks_context.0.0.conv3.weight"].shape == (32, 4, 1, 1, 1)


def test_he_init_and_zero_bias():
    torch.manual_seed(0)
    model = build_stunet("S")
    w = model.conv_blocks_context[3][0].conv2.weight  # 128 -> 128, 3^3
    fan_in = w.shape[1] * 27
    expected_std = math.sqrt(2.0 / (1 + 0.01**2)) / math.sqrt(fan_in)
    assert abs(w.std().item() - expected_std) / expected_std < 0.02
    for name, p in model.named_parameters():
        if name.endswith("bias") and ".norm" not in name:
            assert torch.count_nonzero(p) == 0, name
        if ".norm" in name and name.endswith("weight"):
            assert torch.all(p == 1), name


@pytest.mark.parametrize("bad, key", [
    (dict(size="XL"), "model.size"),
    (dict(size=None), "model.base_width"),
    (dict(pool_strides=[[2, 2, 2]] * 4), "model.pool_strides"),
    (dict(kernel_sizes=[[2, 2, 2]] * 6), "model.kernel_sizes"),
    (dict(blocks_per_stage=[1, 2]), "model.blocks_per_stage"),
])
def test_bad_model_config_names_the_key(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ModelConfig(**bad).resolved()


def test_build_under_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = build_stunet("H")
    assert all(p.is_meta for p in model.parameters())
