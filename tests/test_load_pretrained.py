"""load_pretrained / initialize_from_pretrained: released-layout files, head re-init, stem tiling, safety."""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import CONTRACTS
from export_fixtures import tiny_spec, write_source

import stunet_scale
from stunet_scale.export import CheckpointError, UnsafeCheckpointError, initialize_from_pretrained, load_pretrained
from stunet_scale.export.spec import RELEASED_POOL_STRIDES
from stunet_scale.models import RELEASE_NAMES, build_stunet

REFERENCE = json.loads((CONTRACTS / "stunet_released_state_dicts.json").read_text())["models"]
HEAD_KEYS = [f"seg_outputs.{i}.{p}" for i in range(5) for p in ("weight", "bias")]
STEM = ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")


def released_like(size: str, seed: int = 0) -> OrderedDict:
    """Random weights with exactly the released keys, order and shapes (the contract file)."""
    gen = torch.Generator().manual_seed(seed)
    ref = REFERENCE[RELEASE_NAMES[size]]["state_dict"]
    return OrderedDict((k, torch.randn(shape, generator=gen) * 0.05) for k, shape in ref.items())


def write_v1_model(path, sd):
    """What nnU-Net v1 saved for *_ep4k.model: numpy floats in plot_stuff, SGD momentum, no scheduler."""
    first = next(iter(sd))
    torch.save({
        "epoch": 4000,
        "state_dict": sd,
        "optimizer_state_dict": {"state": {0: {"momentum_buffer": torch.zeros_like(sd[first])}},
                                 "param_groups": [{"lr": 1e-6, "momentum": 0.99, "nesterov": True, "params": [0]}]},
        "lr_scheduler_state_dict": None,
        "plot_stuff": ([0.5, 0.4], [np.float64(0.45)], [0.44], [np.float64(0.81), np.float32(0.82)]),
        "best_stuff": (3999, np.float64(-0.8), np.float64(0.83)),
    }, path)


@pytest.mark.parametrize("size", ["S", "B"])
def test_released_model_file_loads_every_tensor(tmp_path, size):
    sd = released_like(size)
    path = tmp_path / f"{RELEASE_NAMES[size]}_ep4k.model"
    write_v1_model(path, sd)
    model = load_pretrained(path)
    assert model.config.size == size and model.config.num_classes == 105 and model.config.in_channels == 1
    loaded = model.state_dict()
    assert list(loaded) == list(sd)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert not model.load_report.skipped and not model.load_report.adapted
    # A released file carries no metadata: the paper's preprocessing and STU-Net's label order are assumed.
    spec = model.spec
    assert spec.origin == "stunet-release" and spec.axis_order == "ras_zyx"
    assert spec.spacing == [1.5, 1.5, 1.5] and spec.normalization == "zscore"
    assert model.config.pool_strides == RELEASED_POOL_STRIDES
    assert spec.class_map == "stunet" and spec.labels[1] == "adrenal_gland_left" and spec.labels[104] == "vertebrae_T9"


def test_nnunet_v2_pth_with_wrapper_prefixes_loads(tmp_path):
    sd = released_like("S", seed=1)
    wrapped = OrderedDict((f"module._orig_mod.{k}", v) for k, v in sd.items())  # DDP + torch.compile
    torch.save({"network_weights": wrapped, "trainer_name": "STUNetTrainer_small", "current_epoch": 1000,
                "init_args": {"configuration": "3d_fullres", "device": torch.device("cuda")},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, tmp_path / "checkpoint_final.pth")
    model = stunet_scale.load_pretrained(tmp_path / "checkpoint_final.pth")  # the lazy top-level name
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_new_head_reinitialises_exactly_the_seg_outputs(tmp_path):
    sd = released_like("S", seed=2)
    write_v1_model(tmp_path / "small.model", sd)
    model = load_pretrained(tmp_path / "small.model", num_classes=14)
    report = model.load_report
    assert sorted(report.skipped) == sorted(HEAD_KEYS)
    assert all("105 -> 14" in why for why in report.skipped.values())
    assert len(report.loaded) == len(sd) - len(HEAD_KEYS)
    out = model.state_dict()
    assert out["seg_outputs.4.weight"].shape[0] == 14
    assert not torch.equal(out["seg_outputs.4.bias"], sd["seg_outputs.4.bias"][:14])
    assert all(torch.equal(out[k], sd[k]) for k in sd if not k.startswith("seg_outputs."))
    assert model.spec.labels == ["background"] + [f"class_{k}" for k in range(1, 14)] and model.spec.class_map is None
    assert "skipped seg_outputs.0.weight: head re-initialised (105 -> 14 classes)" in str(report)
    # Same class count but a different label set: re-init on request.
    same = load_pretrained(tmp_path / "small.model", reinit_heads=True)
    assert sorted(same.load_report.skipped) == sorted(HEAD_KEYS)


@pytest.mark.parametrize("channel_init, divisor", [("repeat", 1), ("repeat_scaled", 3)])
def test_multichannel_stem_tiling(tmp_path, channel_init, divisor):
    path, sd, _ = write_source(tmp_path / "tiny.pth")
    model = load_pretrained(path, in_channels=3, channel_init=channel_init)
    out = model.state_dict()
    for key in STEM:
        assert out[key].shape[1] == 3
        for c in range(3):
            assert torch.equal(out[key][:, c:c + 1], sd[key] / divisor if divisor > 1 else sd[key])
        assert key in model.load_report.adapted
    assert all(torch.equal(out[k], v) for k, v in sd.items() if k not in STEM)
    if channel_init == "repeat_scaled":
        # Dividing by N keeps the pretrained response to an image copied into every channel.
        single = load_pretrained(path, deep_supervision=False)
        model.deep_supervision = False
        x = torch.randn(1, 1, 32, 32, 32)
        torch.testing.assert_close(model(x.repeat(1, 3, 1, 1, 1)), single(x), rtol=1e-4, atol=1e-4)


def test_encoder_only_loads_the_encoder_alone(tmp_path):
    path, sd, _ = write_source(tmp_path / "tiny.pth")
    model = load_pretrained(path, encoder_only=True, seed=123)
    out = model.state_dict()
    encoder = [k for k in sd if k.startswith("conv_blocks_context.")]
    assert sorted(model.load_report.loaded) == sorted(encoder)
    assert set(model.load_report.skipped) == set(sd) - set(encoder)
    assert all(torch.equal(out[k], sd[k]) for k in encoder)
    assert not torch.equal(out["conv_blocks_localization.0.0.conv1.weight"], sd["conv_blocks_localization.0.0.conv1.weight"])


def test_initialize_from_pretrained_into_a_training_model(tmp_path):
    path, sd, spec = write_source(tmp_path / "tiny.pth")
    model = build_stunet(spec.model_config, in_channels=2, num_classes=7)
    report = initialize_from_pretrained(model, path)
    assert set(report.adapted) == set(STEM) and sorted(report.skipped) == sorted(HEAD_KEYS)
    wrong_size = build_stunet("S")
    with pytest.raises(CheckpointError, match="does not fit this model.*set model"):
        initialize_from_pretrained(wrong_size, path)


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    victim = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(victim), "w"))  # would create a file if unpickled

    zip_file = tmp_path / "evil.model"
    torch.save({"state_dict": {"x": torch.ones(1)}, "plot_stuff": Payload()}, zip_file)
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"network_weights": Payload()}, f, protocol=2)
    for path in (zip_file, legacy):
        with pytest.raises(UnsafeCheckpointError) as err:
            load_pretrained(path)
        assert str(path) in str(err.value) and "open" in str(err.value)
        assert not victim.exists()


def test_truncated_and_missing_files_name_the_file(tmp_path):
    path, _, _ = write_source(tmp_path / "tiny.pth")
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable torch checkpoint.*truncated"):
        load_pretrained(cut)
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_pretrained(tmp_path / "empty.model")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nope.model")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1000)}, str(tmp_path / "model.safetensors"))
    st = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(st[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(tmp_path / "model.safetensors")


def test_not_an_stunet_file_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {"fc.weight": torch.ones(2, 2)}}, tmp_path / "resnet.model")
    with pytest.raises(CheckpointError, match="not an STU-Net state dict"):
        load_pretrained(tmp_path / "resnet.model")
    assert os.path.exists(tmp_path / "resnet.model")


def test_spec_round_trips_through_load(tmp_path):
    path, _, spec = write_source(tmp_path / "tiny.pth", spec=tiny_spec())
    model = load_pretrained(path)
    assert model.spec.labels == spec.labels and model.spec.spacing == spec.spacing
    assert model.spec.training["steps"] == 120
