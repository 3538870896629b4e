"""nnU-Net v2 layouts: the trainer checkpoint dict and a drop-in ``nnUNet_results`` model folder.

The folder predicts with an unmodified ``nnunetv2`` (tested against 2.8.1 from PyPI):

    export nnUNet_results=OUT/nnunet
    nnUNetv2_predict -i imagesTs -o pred -d 900 -c 3d_fullres -f 0
    # or: nnUNetv2_predict_from_modelfolder -i imagesTs -o pred -m OUT/nnunet/Dataset900_*/nnUNetTrainer__nnUNetPlans__3d_fullres -f 0

How the plans keep nnU-Net's preprocessing identical to how the model was trained:

* ``trainer_name = "nnUNetTrainer"`` (stock); its ``build_network_architecture`` calls
  ``get_network_from_plans``, which imports ``architecture.network_class_name`` =
  ``stunet_scale.export.nnunet_network.STUNetForNNUNet`` (so ``stunet-scale`` must be installed
  next to nnunetv2) with ``arch_kwargs`` = our ``ModelConfig`` fields.
* ``image_reader_writer = "NibabelIOWithReorient"``: nnU-Net reorients every image to RAS and hands
  the array over as (z, y, x), the SimpleITK order of a RAS file: exactly what the STU-Net release
  saw. Our weights are exported in that convention (``stunet_scale.export.axes``), so
  ``transpose_forward`` is ``[0, 1, 2]`` as in the release plans; predictions are reoriented back
  to the input's geometry by the same reader/writer. (An old ``ras_xyz`` spec still gets
  ``[2, 1, 0]``, so folders written before the convention changed keep working.)
* ``spacing`` / ``patch_size`` / the architecture's ``pool_strides`` are the training ones in
  network axis order (for the paper recipes the release's ``[[2,2,2]]*4 + [[1,1,2]]``);
  ``normalization_schemes`` is ``ZScoreNormalization`` (per image over nnU-Net's nonzero box, STU-Net's
  "nonCT": exactly the statistics ``data.normalization=zscore`` trains with) or ``CTNormalization``
  with the prepared store's foreground statistics; image resampling uses the same spline order.
* ``inference_allowed_mirroring_axes`` are the axes flipped during training.

A model trained with ``data.normalization=zscore_stored`` (statistics over the store's body box)
cannot be reproduced by nnU-Net's preprocessor; its spec says ``crop="body"`` and the model card
says so. ``tests/test_export_nnunet.py`` measures the agreement of the two predictors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .nnunet_network import NETWORK_CLASS_NAME
from .spec import ModelSpec, _plain

CONFIGURATION = "3d_fullres"
PLANS_NAME = "nnUNetPlans"
TRAINER_NAME = "nnUNetTrainer"
CHECKPOINT_NAME = "checkpoint_final.pth"
DEFAULT_DATASET_ID = 900
ARCH_FIELDS = ("size", "base_width", "blocks_per_stage", "width_multipliers", "pool_strides", "kernel_sizes")


def dataset_name(spec: ModelSpec, dataset_id: int = DEFAULT_DATASET_ID, name: str | None = None) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if name is None:
        size = spec.model.get("size")
        name = f"STUNet{size}" if size else "STUNet"
        if spec.class_map:
            name += "_" + spec.class_map.replace("-", "").replace("_", "")
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)
    return f"Dataset{int(dataset_id):03d}_{safe}"


def _transpose(spec: ModelSpec) -> list[int]:
    # NibabelIOWithReorient yields RAS arrays in (z, y, x); our stores are RAS (x, y, z).
    return [2, 1, 0] if spec.axis_order == "ras_xyz" else [0, 1, 2]


def build_dataset_json(spec: ModelSpec, name: str, num_training: int | None = None) -> dict:
    labels = {}
    for k, label in enumerate(spec.labels):
        label = "background" if k == 0 else label  # nnU-Net's LabelManager requires this exact name for 0
        if label in labels:
            raise ValueError(f"label name {label!r} appears twice; nnU-Net needs unique names")
        labels[label] = k
    channel = "CT" if spec.normalization == "ct" else "zscore"  # nnU-Net maps these names to the same schemes
    if spec.in_channels == 1:
        channel_names = {"0": channel}
    else:
        channel_names = {str(c): f"{channel}_{c}" for c in range(spec.in_channels)}
    return {
        "name": name,
        "description": f"STU-Net exported by stunet-scale ({spec.origin}); class map {spec.class_map or 'custom'}"
                       + (f", TotalSegmentator {spec.totalseg_version}" if spec.totalseg_version else ""),
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": int(num_training or 0),
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIOWithReorient",
    }


def build_plans(spec: ModelSpec, name: str) -> dict:
    transpose = _transpose(spec)
    arch_kwargs = {k: spec.model[k] for k in ARCH_FIELDS}
    scheme = "CTNormalization" if spec.normalization == "ct" else "ZScoreNormalization"
    stats = spec.intensity_stats or {}
    order = 3 if spec.image_interpolation == "cubic" else 1
    resample = lambda o: {"is_seg": False, "order": o, "order_z": 0, "force_separate_z": None}  # noqa: E731
    median = (spec.train_config or {}).get("data", {}).get("median_shape") or list(spec.patch_size)
    return {
        "dataset_name": name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": list(spec.spacing),
        "original_median_shape_after_transp": list(median),
        "image_reader_writer": "NibabelIOWithReorient",
        "transpose_forward": transpose,
        "transpose_backward": transpose,  # [2,1,0] and [0,1,2] are their own inverses
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(spec.patch_size),
                "median_image_size_in_voxels": list(median),
                "spacing": list(spec.spacing),
                "normalization_schemes": [scheme] * spec.in_channels,
                "use_mask_for_norm": [False] * spec.in_channels,
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resample(order),
                "resampling_fn_seg_kwargs": {**resample(1), "is_seg": True},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": resample(1),
                "architecture": {
                    "network_class_name": NETWORK_CLASS_NAME,
                    "arch_kwargs": _plain(arch_kwargs),
                    "_kw_requires_import": [],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): dict(stats) for c in range(spec.in_channels)},
    }


def nnunet_checkpoint(state_dict: dict, spec: ModelSpec, plans: dict, dataset_json: dict) -> dict:
    """A dict with the keys ``nnUNetTrainer.save_checkpoint`` writes, weights only (no optimizer).

    Plain types only, so it also loads with ``torch.load(weights_only=True)``.
    """
    epoch = spec.training.get("epoch") or spec.training.get("epochs") or 0
    return {
        "network_weights": state_dict,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {k: [] for k in ("mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region", "train_losses",
                                    "val_losses", "lrs", "epoch_start_timestamps", "epoch_end_timestamps")},
        "_best_ema": None,
        "current_epoch": int(round(float(epoch))),
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json,
                      "device": torch.device("cuda")},
        "trainer_name": TRAINER_NAME,
        "inference_allowed_mirroring_axes": tuple(int(a) for a in spec.mirror_axes) or None,
        "stunet_scale_spec": spec.to_dict(),
    }


def write_nnunet_folder(root: Path, spec: ModelSpec, plans: dict, dataset_json: dict, name: str) -> Path:
    """``root/<name>/nnUNetTrainer__nnUNetPlans__3d_fullres/{dataset.json, plans.json, fold_0/}``.

    The caller saves ``nnunet_checkpoint(...)`` straight to ``fold_0/checkpoint_final.pth`` (no copy).
    """
    folder = root / name / f"{TRAINER_NAME}__{PLANS_NAME}__{CONFIGURATION}"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    (folder / "plans.json").write_text(json.dumps(plans, indent=2) + "\n")
    return folder


def spec_from_plans(plans: dict, configuration: str, dataset_json: dict, checkpoint: dict | None = None) -> ModelSpec:
    """Our spec recovered from nnU-Net plans that name our network (fallback when the spec is absent)."""
    from ..models.stunet import ModelConfig

    conf = plans["configurations"][configuration]
    arch = conf["architecture"]["arch_kwargs"]
    labels_map = dataset_json.get("labels", {})
    labels = [name for name, _ in sorted(labels_map.items(), key=lambda kv: kv[1])]
    sd = (checkpoint or {}).get("network_weights", {})
    in_ch = int(sd["conv_blocks_context.0.0.conv1.weight"].shape[1]) if "conv_blocks_context.0.0.conv1.weight" in sd \
        else len(dataset_json.get("channel_names", {"0": ""}))
    num_classes = int(sd["seg_outputs.0.weight"].shape[0]) if "seg_outputs.0.weight" in sd else len(labels)
    model = ModelConfig(**{k: arch[k] for k in ARCH_FIELDS if k in arch}, in_channels=in_ch,
                        num_classes=num_classes).resolved()
    scheme = conf["normalization_schemes"][0]
    ct = scheme == "CTNormalization"
    mirror = (checkpoint or {}).get("inference_allowed_mirroring_axes") or []
    return ModelSpec(
        model=_plain(dataclasses.asdict(model)),
        spacing=[float(s) for s in conf["spacing"]],
        patch_size=[int(p) for p in conf["patch_size"]],
        normalization="ct" if ct else "zscore",
        intensity_stats=plans.get("foreground_intensity_properties_per_channel", {}).get("0") if ct else None,
        image_interpolation="cubic" if int(conf.get("resampling_fn_data_kwargs", {}).get("order", 3)) == 3 else "linear",
        crop="nonzero",  # what nnU-Net's preprocessor does
        axis_order="ras_xyz" if list(plans.get("transpose_forward", [0, 1, 2])) == [2, 1, 0] else "ras_zyx",
        labels=labels if len(labels) == num_classes else [],
        mirror_axes=[int(a) for a in mirror],
        origin="stunet-scale",
    )
