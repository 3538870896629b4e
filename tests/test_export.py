"""`stunet-scale export`: every format reloads bit-exact, keys as released, layouts consumers expect."""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict

import pytest
import torch
from export_fixtures import TINY_LABELS, write_source

from stunet_scale.cli import main
from stunet_scale.export import export, load_pretrained, read_weights
from stunet_scale.export.axes import TRAINING_AXIS_ORDER, TRANSFER_AXIS_ORDER, to_axis_order
from stunet_scale.export.exporter import reload_all
from stunet_scale.export.nnunet_network import NETWORK_CLASS_NAME, STUNetForNNUNet

NNUNET_CKPT_KEYS = {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
                    "init_args", "trainer_name", "inference_allowed_mirroring_axes"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    source, sd, spec = write_source(root / "run_checkpoint.pth")
    result = export(source, root / "out", log=lambda *a: None)
    return result, sd, spec


def release_axes(sd, spec):
    """What every export must hold: the trained (x, y, z) weights in the release's (z, y, x) convention."""
    return to_axis_order(OrderedDict(sd), spec, TRANSFER_AXIS_ORDER)


def test_every_format_reloads_bit_exact_with_released_keys(exported):
    result, trained, spec = exported
    sd, _ = release_axes(trained, spec)
    assert not torch.equal(sd["conv_blocks_context.0.0.conv1.weight"], trained["conv_blocks_context.0.0.conv1.weight"])
    out = result.out
    found = reload_all(out)
    assert sorted(found) == sorted([
        "hf/model.safetensors", "stunet/checkpoint_final.pth", f"stunet/{result.name}.model",
        "nnunet/Dataset900_STUNet_custom/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth",
    ])
    for rel, loaded in found.items():
        if not rel.endswith(".safetensors"):
            assert list(loaded) == list(sd), rel  # released key order, no module./_orig_mod.
        assert set(loaded) == set(sd), rel
        for key, tensor in sd.items():
            assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], tensor), (rel, key)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in found["hf/model.safetensors"])


def test_torch_layouts_match_nnunet_v1_and_v2(exported):
    result, _, spec = exported
    v1 = torch.load(result.out / "stunet" / f"{result.name}.model", weights_only=True)
    assert {"epoch", "state_dict", "optimizer_state_dict", "plot_stuff"} <= set(v1) and len(v1["plot_stuff"]) == 4
    v2 = torch.load(result.out / "stunet" / "checkpoint_final.pth", weights_only=True)
    assert NNUNET_CKPT_KEYS <= set(v2)
    assert v2["trainer_name"] == "nnUNetTrainer" and v2["init_args"]["configuration"] == "3d_fullres"
    # trained with flips of x and y = network axes 2 and 1 in the release's (z, y, x) order
    assert v2["inference_allowed_mirroring_axes"] == (1, 2) and v2["current_epoch"] == 2
    assert result.name == "stunet_step120"  # epochs are fractional in this tiny run, so steps name it


def test_nnunet_folder_plans_name_our_network(exported):
    result, trained, spec = exported
    sd, _ = release_axes(trained, spec)
    folder = result.nnunet_folder
    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    conf = plans["configurations"]["3d_fullres"]
    assert conf["architecture"]["network_class_name"] == NETWORK_CLASS_NAME
    assert conf["spacing"] == [2.0, 2.0, 2.0] and conf["patch_size"] == [32, 32, 32]
    assert conf["normalization_schemes"] == ["ZScoreNormalization"]
    assert plans["image_reader_writer"] == "NibabelIOWithReorient" and plans["transpose_forward"] == [0, 1, 2]
    assert dataset["labels"] == {name: k for k, name in enumerate(TINY_LABELS)}
    # Built exactly as nnU-Net's get_network_from_plans builds it, the weights load strictly.
    net = STUNetForNNUNet(input_channels=1, num_classes=len(TINY_LABELS), deep_supervision=False,
                          **conf["architecture"]["arch_kwargs"])
    net.load_state_dict(sd, strict=True)
    net.decoder.deep_supervision = True
    assert net.deep_supervision


def test_safetensors_config_and_card(exported):
    result, _, spec = exported
    config = json.loads((result.out / "hf" / "config.json").read_text())
    assert config["in_channels"] == 1 and config["num_classes"] == 4
    assert config["labels"] == {str(k): n for k, n in enumerate(TINY_LABELS)}
    assert config["spacing_mm"] == [2.0, 2.0, 2.0] and config["normalization"]["scheme"] == "zscore"
    assert config["training"]["steps"] == 120 and config["training"]["samples_seen"] == 240
    assert config["training"]["git_revision"] == "0123abcd"
    # the convention downstream tools need, stated where they look
    assert config["axis_order"] == "ras_zyx" and "SimpleITK" in config["axis_convention"]
    assert config["pool_strides"] == [s[::-1] for s in spec.model["pool_strides"]]
    assert "nnU-Net" in config["normalization"]["intensity_region"]
    card = (result.out / "hf" / "README.md").read_text()
    assert "convention of the released STU-Net checkpoints" in card
    assert card.startswith("---\nlibrary_name: stunet-scale\nlicense: other")
    assert "| liver | 0.9100 |" in card and "| kidney_left | 0.7700 |" in card  # validation Dice table
    # sha256 of every weights/config file is in the card and in SHA256SUMS
    sums = dict(line.split("  ")[::-1] for line in (result.out / "SHA256SUMS").read_text().splitlines())
    for rel, digest in sums.items():
        assert hashlib.sha256((result.out / rel).read_bytes()).hexdigest() == digest, rel
        if not rel.endswith("README.md"):
            assert f"| {rel} | `{digest}` |" in card


def test_every_format_loads_back_with_load_pretrained(exported):
    result, trained, spec = exported
    sd, zyx_spec = release_axes(trained, spec)
    sources = [result.out, result.out / "hf", result.out / "hf" / "model.safetensors",
               result.out / "stunet" / f"{result.name}.model", result.out / "stunet" / "checkpoint_final.pth",
               result.nnunet_folder]
    for path in sources:
        model = load_pretrained(path)  # as stored: the release's convention
        assert model.spec.axis_order == TRANSFER_AXIS_ORDER, path
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items()), path
        assert model.spec.labels == TINY_LABELS and model.spec.spacing == zyx_spec.spacing, path
        assert model.spec.model_config == zyx_spec.model_config, path
        back = load_pretrained(path, axis_order=TRAINING_AXIS_ORDER)  # what we trained, bit for bit
        assert all(torch.equal(back.state_dict()[k], v) for k, v in trained.items()), path
        assert back.spec.model_config == spec.model_config and back.spec.mirror_axes == spec.mirror_axes, path


def test_export_of_an_export_and_of_a_released_file(tmp_path, exported):
    result, sd, spec = exported
    again = export(result.out / "hf", tmp_path / "again", formats=["safetensors"], log=lambda *a: None)
    assert torch.equal(read_weights(again.out).state_dict["seg_outputs.4.bias"], sd["seg_outputs.4.bias"])
    assert sorted(p.name for p in again.out.iterdir()) == ["README.md", "SHA256SUMS", "hf"]
    bare = tmp_path / "small_ep4k.model"
    torch.save({"state_dict": sd, "epoch": 4000}, bare)
    released = export(bare, tmp_path / "released", formats=["nnunet"], log=lambda *a: None)
    plans = json.loads((released.nnunet_folder / "plans.json").read_text())
    assert plans["transpose_forward"] == [0, 1, 2]  # the release saw SimpleITK's (z, y, x)
    assert not (released.out / "stunet").exists()


def test_export_refuses_a_non_empty_target_and_leaves_no_partial(tmp_path):
    source, _, _ = write_source(tmp_path / "ckpt.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(source, out, log=lambda *a: None)
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="unknown export format"):
        export(source, tmp_path / "x", formats=["tflite"], log=lambda *a: None)
    assert not list(tmp_path.glob("*.partial-*"))


def test_cli_export(tmp_path, capsys):
    source, sd, _ = write_source(tmp_path / "ckpt.pth")
    assert main(["export", str(source), str(tmp_path / "cli"), "--formats", "stunet", "--name", "mine"]) == 0
    assert (tmp_path / "cli" / "stunet" / "mine.model").is_file()
    assert "bit-identical" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing.pth"), str(tmp_path / "cli2")]) == 1
    assert "not found" in capsys.readouterr().err


def test_store_manifest_flows_into_spec_and_plans(tmp_path):
    from export_fixtures import tiny_train_config

    from stunet_scale.export.nnunet_folder import build_plans
    from stunet_scale.export.spec import spec_from_train_config

    cfg = tiny_train_config()
    cfg["data"]["normalization"] = "ct"
    # the layout `stunet-scale prepare` writes (stunet_scale/data/ingest/prepare.py)
    manifest = {"class_map": {"name": "dataset.json", "labels": ["background", "a", "b", "c"], "num_classes": 4},
                "preprocessing": {"crop": "nonzero", "image_interpolation": "linear", "target_spacing": [2, 2, 2]},
                "intensity": {"foreground": {"mean": 80.0, "std": 120.0, "percentile_00_5": -90.0,
                                             "percentile_99_5": 300.0, "median": 70.0}}}
    spec = spec_from_train_config(cfg, manifest=manifest)
    assert spec.labels == ["background", "a", "b", "c"] and spec.class_map == "dataset.json"
    assert spec.crop == "nonzero" and spec.image_interpolation == "linear"
    assert spec.intensity_stats == {"mean": 80.0, "std": 120.0, "percentile_00_5": -90.0, "percentile_99_5": 300.0}
    conf = build_plans(spec, "Dataset900_x")["configurations"]["3d_fullres"]
    assert conf["normalization_schemes"] == ["CTNormalization"] and conf["resampling_fn_data_kwargs"]["order"] == 1
    with pytest.raises(ValueError, match="--manifest"):
        spec_from_train_config(cfg, manifest={"class_map": manifest["class_map"]})
    # data.normalization=zscore: nnU-Net's nonzero-box statistics, unless the store predates them
    # (format 1), whose "zscore" was the stored crop's, which the spec must then say.
    cfg["data"]["normalization"] = "zscore"
    assert spec_from_train_config(cfg, manifest={**manifest, "format_version": 2}).crop == "nonzero"
    old = {**manifest, "format_version": 1, "preprocessing": {**manifest["preprocessing"], "crop": "body"}}
    assert spec_from_train_config(cfg, manifest=old).crop == "body"


def test_nnunet_folder_without_our_spec_is_read_from_its_plans(tmp_path, exported):
    import shutil

    result, sd, spec = exported
    folder = tmp_path / "folder"
    shutil.copytree(result.nnunet_folder, folder)
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    del ckpt["stunet_scale_spec"]  # as if another tool had rewritten the checkpoint
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    weights = read_weights(folder)
    assert weights.format == "nnunet-folder"
    assert weights.spec.labels == TINY_LABELS and weights.spec.spacing == spec.spacing
    assert weights.spec.axis_order == "ras_zyx" and weights.spec.mirror_axes == [1, 2]
    assert weights.spec.model_config == release_axes(sd, spec)[1].model_config


def test_nan_dice_is_written_as_null_and_the_json_is_strict(tmp_path):
    import dataclasses

    from export_fixtures import tiny_spec, tiny_state_dict

    spec = tiny_spec()
    # A class absent from every validation case has an undefined (NaN) Dice in the run's metrics.
    spec = dataclasses.replace(spec, training=dict(spec.training, validation={
        "dice_per_class": {"liver": 0.91, "spleen": float("nan"), "kidney_left": 0.77}, "mean_dice": float("nan")}))
    torch.save({"network_weights": tiny_state_dict(spec), "stunet_scale_spec": spec.to_dict()}, tmp_path / "s.pth")
    result = export(tmp_path / "s.pth", tmp_path / "out", formats=["safetensors"], log=lambda *a: None)
    text = (result.out / "hf" / "config.json").read_text()
    assert "NaN" not in text
    config = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert config["training"]["validation"]["dice_per_class"]["spleen"] is None
    assert config["training"]["validation"]["mean_dice"] is None
    card = (result.out / "README.md").read_text()
    assert "| spleen | - (absent from the validation cases) |" in card
    assert re.search(r"\bnan\b", card, re.IGNORECASE) is None
    assert "mean 0.8400" in card  # over the classes that have a Dice


def test_manifest_case_counts_reach_dataset_json_and_card(tmp_path):
    from export_fixtures import tiny_state_dict, tiny_train_config

    from stunet_scale.export.spec import spec_from_train_config

    cfg = tiny_train_config()
    cfg["data"]["train_splits"] = ["train", "extra"]
    manifest = {"class_map": {"name": "custom", "labels": ["background", "a", "b", "c"], "num_classes": 4},
                "stats": {"splits": {"extra": 5, "train": 37, "val": 4}}}
    spec = spec_from_train_config(cfg, training={"steps": 3}, manifest=manifest)
    assert spec.training["num_training_cases"] == 42
    assert spec.training["cases_per_split"] == {"extra": 5, "train": 37, "val": 4}
    torch.save({"network_weights": tiny_state_dict(spec), "stunet_scale_spec": spec.to_dict()}, tmp_path / "s.pth")
    result = export(tmp_path / "s.pth", tmp_path / "out", formats=["nnunet", "safetensors"], log=lambda *a: None)
    assert json.loads((result.nnunet_folder / "dataset.json").read_text())["numTraining"] == 42
    card = (result.out / "README.md").read_text()
    assert "| training cases | 42 (prepared cases per split: extra 5, train 37, val 4) |" in card


def test_card_and_readme_say_what_the_model_file_is_for(exported):
    result, _, _ = exported
    card = (result.out / "README.md").read_text()
    assert ".model.pkl" in card and "load_pretrained" in card
    assert not list(result.out.rglob("*.pkl"))  # no pickle sidecar is shipped


def test_files_are_written_in_place_and_hashed_once(tmp_path, monkeypatch):
    from stunet_scale.export import exporter

    source, _, _ = write_source(tmp_path / "ckpt.pth")
    hashed = []
    real = exporter.sha256_file
    monkeypatch.setattr(exporter, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    copies = []
    monkeypatch.setattr(exporter.shutil, "copyfile", lambda *a, **k: copies.append(a))
    result = export(source, tmp_path / "out", formats=["nnunet"], log=lambda *a: None)
    assert not copies and not (result.out / "stunet").exists()
    assert sorted(hashed) == sorted(["dataset.json", "plans.json", "checkpoint_final.pth", "README.md"])
    sums = (result.out / "SHA256SUMS").read_text()
    assert sums.count("\n") == 4 and result.files == dict(line.split("  ")[::-1] for line in sums.splitlines())


def test_last_validation_of_a_run_reaches_the_card(tmp_path):
    from export_fixtures import tiny_spec

    from stunet_scale.export.checkpoint_io import _last_validation
    from stunet_scale.export.hf_bundle import validation_table

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000000020"
    ckpt.mkdir(parents=True)
    rows = [
        {"kind": "train", "step": 10, "loss": 1.0},
        {"kind": "val", "step": 10, "epoch": 1, "mean_dice": 0.5, "per_class": {"liver": 0.6, "spleen": 0.4, "kidney_left": 0.5}},
        {"kind": "val", "step": 20, "epoch": 2, "mean_dice": 0.7, "per_class": {"liver": 0.8, "spleen": 0.6, "kidney_left": 0.7}},
        {"kind": "val", "step": 30, "epoch": 3, "mean_dice": 0.9, "per_class": {"liver": 0.9, "spleen": 0.9, "kidney_left": 0.9}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{truncated last li")
    # the newest full validation at or before the checkpoint's step, not a later one
    val = _last_validation(ckpt, 20)
    assert val == {"dice_per_class": {"liver": 0.8, "spleen": 0.6, "kidney_left": 0.7}, "mean_dice": 0.7,
                   "step": 20, "epoch": 2}
    assert _last_validation(tmp_path / "elsewhere" / "x" / "y", 20) is None
    spec = tiny_spec()
    spec.training = dict(spec.training, validation=val)
    table = "\n".join(validation_table(spec))
    assert "mean 0.7000" in table and "| liver | 0.8000 |" in table and "| spleen | 0.6000 |" in table


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_exported_files_are_team_readable_under_the_umask(tmp_path, umask, mode):
    # safetensors' save_file creates 0600 files: a shared export would be unreadable to the team.
    # Every file gets what a plain open() gives, so a private umask (077) keeps files private.
    import os
    import stat

    source, _, _ = write_source(tmp_path / "ckpt.pth")
    old = os.umask(umask)
    try:
        result = export(source, tmp_path / "out", formats=["stunet", "nnunet", "safetensors"], verify=False,
                        log=lambda *a: None)
    finally:
        os.umask(old)
    files = [p for p in result.out.rglob("*") if p.is_file()]
    assert result.out / "hf" / "model.safetensors" in files and len(files) >= 8
    modes = {str(p.relative_to(result.out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(mode)}, modes
