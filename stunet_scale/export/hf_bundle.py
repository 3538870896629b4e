"""``model.safetensors`` + ``config.json`` + ``README.md`` (model card): the Hugging Face-style bundle.

safetensors cannot run code when opened (unlike a pickle), is memory-mappable, and every framework
reads it. ``config.json`` holds our ``ModelSpec`` under ``"spec"`` plus flat, human-readable
fields (architecture, channels, classes, spacing, ...). The card says what the model is for, how it
was trained, how to load it in three ecosystems, per-class validation Dice when the run recorded
it, and the sha256 of every exported file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..checkpointing.portable import make_team_readable
from .spec import ModelSpec


def write_safetensors(state_dict: dict, path: Path, spec: ModelSpec) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage and non-contiguous tensors. Copy only those (the first
    # tensor of a storage is written as is, later ones sharing it are cloned): a blanket clone
    # would hold a second full copy of the model in memory while the file is written.
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        if not v.is_contiguous():
            v = v.contiguous()  # a fresh storage of its own
        elif v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    save_file(tensors, str(path), metadata={"format": "pt", "stunet_scale_spec_format": "config.json"})
    make_team_readable(path)  # save_file creates 0600: a shared export would be unreadable to the team


def build_config_json(spec: ModelSpec, export_info: dict) -> dict:
    m = spec.model
    return {
        "architecture": "STUNet",
        "library": "stunet-scale",
        "size": m.get("size"),
        "base_width": m["base_width"],
        "blocks_per_stage": m["blocks_per_stage"],
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "class_map": spec.class_map,
        "totalsegmentator_version": spec.totalseg_version,
        "labels": {str(k): name for k, name in enumerate(spec.labels)},
        "spacing_mm": spec.spacing,
        "patch_size": spec.patch_size,
        "axis_order": spec.axis_order,
        "axis_convention": AXIS_TEXT[spec.axis_order],
        "pool_strides": m["pool_strides"],
        "normalization": {"scheme": spec.normalization, "stats": spec.intensity_stats,
                          "description": NORMALIZATION_TEXT[spec.normalization],
                          "intensity_region": CROP_TEXT[spec.crop]},
        "training": spec.training,
        "export": export_info,
        "spec": spec.to_dict(),
    }


NORMALIZATION_TEXT = {
    "zscore": "per image: (x - mean(x)) / max(std(x), 1e-8), statistics of the original image over the intensity region (STU-Net's 'nonCT', nnU-Net's ZScoreNormalization)",
    "ct": "clip to the dataset's foreground 0.5/99.5 HU percentiles, subtract its mean, divide by its std (nnU-Net CT)",
}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def validation_table(spec: ModelSpec) -> list[str]:
    """Markdown rows of per-class validation Dice, from what the run recorded (nothing invented)."""
    val = spec.training.get("validation") if isinstance(spec.training, dict) else None
    if not isinstance(val, dict):
        return []
    per_class = val.get("dice_per_class") or val.get("per_class") or {
        k: v for k, v in val.items() if k not in ("mean_dice", "cases", "step", "epoch")}
    rows = []
    for key, value in per_class.items():
        # None / NaN: the class was in no validation case (Dice undefined); listed, not averaged.
        if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
            name = key
            if str(key).isdigit() and int(key) < len(spec.labels):
                name = spec.labels[int(key)]
            rows.append((name, float(value) if value is not None else math.nan))
    if not rows:
        return []
    lines = ["| class | Dice |", "|---|---|"] + [
        f"| {n} | {d:.4f} |" if math.isfinite(d) else f"| {n} | - (absent from the validation cases) |" for n, d in rows]
    mean = val.get("mean_dice")
    finite = [d for _, d in rows if math.isfinite(d)]
    if not isinstance(mean, (int, float)) or not math.isfinite(mean):
        if not finite:
            return ["Validation Dice is undefined for every class (none present in the validation cases).", "",
                    *lines]
        mean = sum(finite) / len(finite)
    extra = f" over {val['cases']} cases" if "cases" in val else ""
    return [f"Validation Dice{extra}, mean {float(mean):.4f}:", "", *lines]


def build_card(spec: ModelSpec, export_info: dict, files: dict[str, str], license_id: str = "other") -> str:
    """README.md model card. ``files`` maps every exported file (relative path) to its sha256."""
    m, t = spec.model, spec.training or {}
    size = m.get("size") or f"custom (base width {m['base_width']})"
    params = export_info.get("parameters")
    released = spec.origin == "stunet-release"
    names = spec.labels
    front = [
        "---",
        "library_name: stunet-scale",
        f"license: {license_id}",
        "tags: [medical-imaging, segmentation, ct, 3d, stu-net, nnu-net]",
        "datasets: [TotalSegmentator]" if spec.class_map else "datasets: []",
        "metrics: [dice]",
        "pipeline_tag: image-segmentation",
        "---",
    ]
    lines = front + [
        "",
        f"# STU-Net-{m.get('size') or 'custom'} ({spec.num_classes} outputs)",
        "",
        "A residual 3D U-Net (STU-Net, Huang et al. 2023, arXiv 2304.06716) for CT segmentation"
        + (" from the STU-Net release, re-exported by stunet-scale." if released else ", pretrained with stunet-scale."),
        "",
        "## Intended use",
        "",
        "- Initialisation for fine-tuning on new 3D segmentation tasks (new label sets, more input channels)",
        "  with `stunet_scale.load_pretrained`, `stunet-scale train` (`checkpoint.init_from`) or nnU-Net v2.",
        "- Direct inference on CT with `stunet-scale predict` or nnU-Net v2's own predictor, for the classes below.",
        "- Research use. Not a medical device; predictions must not drive clinical decisions without validation.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| size | {size} |",
        f"| parameters | {_fmt(params)} |",
        f"| stage widths | {[m['base_width'] * w for w in m['width_multipliers']]} |",
        f"| blocks per stage | {m['blocks_per_stage']} |",
        f"| pool strides | {m['pool_strides']} |",
        f"| input channels | {spec.in_channels} |",
        f"| output channels | {spec.num_classes} (background included) |",
        f"| class map | {spec.class_map or 'custom'}"
        + (f" (TotalSegmentator {spec.totalseg_version} names)" if spec.totalseg_version else "") + " |",
        "",
        "## Preprocessing the weights expect",
        "",
        "| | |",
        "|---|---|",
        f"| orientation / axes | {AXIS_TEXT[spec.axis_order]} |",
        f"| voxel spacing | {spec.spacing} mm |",
        f"| image resampling | {'cubic spline (order 3)' if spec.image_interpolation == 'cubic' else 'linear'}"
        " (a coarse axis with spacing ratio > 3 separately, nearest) |",
        f"| intensity region | {CROP_TEXT[spec.crop]} |",
        f"| intensity normalisation | {spec.normalization}: {NORMALIZATION_TEXT[spec.normalization]} |",
    ]
    if spec.intensity_stats:
        lines.append(f"| normalisation statistics | {json.dumps(spec.intensity_stats)} |")
    lines += [
        f"| patch size | {spec.patch_size} (sliding window, Gaussian weighting) |",
        f"| mirroring TTA axes | {spec.mirror_axes or 'none (trained without flips)'} |",
        "",
        "`stunet-scale predict` and the exported nnU-Net folder apply exactly this and map the prediction",
        "back to the input's own orientation, spacing and shape.",
        "",
        "## Training",
        "",
    ]
    if released:
        lines += [
            "Weights from the STU-Net release (uni-medical/STU-Net), trained by nnU-Net v1 on TotalSegmentator v1",
            "(104 classes + background, STU-Net's sorted label order) for 4000 epochs of 250 steps at batch 2,",
            "SGD (momentum 0.99, lr 1e-2, poly decay), Dice + CE with deep supervision. The file carried no",
            "training metadata; the preprocessing above is the paper's (1.5 mm, per-image z-score, 128^3 patches).",
        ]
    else:
        cfg = spec.train_config or {}
        sched, optim, data, dist = (cfg.get(k, {}) for k in ("schedule", "optim", "data", "distributed"))
        lines += [
            "| | |",
            "|---|---|",
            f"| optimizer steps | {_fmt(t.get('steps'))} |",
            f"| samples seen | {_fmt(t.get('samples_seen'))} |",
            f"| epochs | {_fmt(t.get('epoch'))} (of {_fmt(sched.get('epochs'))} x {_fmt(sched.get('samples_per_epoch'))} samples) |",
            f"| global batch | {_fmt(sched.get('global_batch'))} |",
            f"| optimizer | {optim.get('name', '-')} lr {_fmt(optim.get('lr'))}, momentum {_fmt(optim.get('momentum'))}, "
            f"weight decay {_fmt(optim.get('weight_decay'))}, poly power {_fmt(sched.get('poly_power'))} |",
            f"| data | {data.get('root', '-')} ({data.get('class_map', '-')} labels, splits {data.get('train_splits', '-')}) |",
            f"| training cases | {_fmt(t.get('num_training_cases'))}"
            + (f" (prepared cases per split: {', '.join(f'{k} {v:,}' for k, v in t['cases_per_split'].items())})"
               if isinstance(t.get("cases_per_split"), dict) else "") + " |",
            f"| distributed | {dist.get('backend', '-')} (ZeRO {dist.get('zero_stage', '-')}), {dist.get('precision', '-')} |",
            f"| git revision | {t.get('git_revision') or t.get('git_commit') or 'not recorded'} |",
            "",
            "The full resolved training config is in `config.json` (`spec.train_config`).",
        ]
    table = validation_table(spec)
    lines += ["", "## Validation", ""]
    lines += table if table else ["No validation results were recorded with this checkpoint."]
    lines += [
        "",
        "## Classes",
        "",
        "| value | name |",
        "|---|---|",
        *[f"| {k} | {n} |" for k, n in enumerate(names)],
        "",
        "## How to load",
        "",
        "```python",
        "import stunet_scale",
        "model = stunet_scale.load_pretrained('hf/')                        # as exported",
        "model = stunet_scale.load_pretrained('hf/', num_classes=14)        # new head, report lists skipped keys",
        "model = stunet_scale.load_pretrained('hf/', in_channels=2)         # CT+PET: stem tiled (channel_init=...)",
        "```",
        "",
        "Plain PyTorch (no stunet-scale at run time beyond the model file):",
        "",
        "```python",
        "import json; from safetensors.torch import load_file",
        "from stunet_scale.models import STUNet, ModelConfig",
        "spec = json.load(open('hf/config.json'))['spec']",
        "model = STUNet(ModelConfig(**spec['model'])); model.load_state_dict(load_file('hf/model.safetensors'))",
        "```",
        "",
        "STU-Net's own fine-tuning scripts read `stunet/*.model` (`state_dict`, nnU-Net v1) or",
        "`stunet/checkpoint_final.pth` (`network_weights`, nnU-Net v2); the key names are the released ones.",
        "`stunet/*.model` is for STU-Net fine-tuning and `stunet_scale.load_pretrained` only: it comes without",
        "the `.model.pkl` sidecar (nnU-Net v1's pickled plans) that nnU-Net v1 *prediction* needs. None is shipped",
        "because unpickling it runs code; predict with `stunet-scale predict` or the nnU-Net v2 folder instead.",
        "nnU-Net v2 (unmodified, with stunet-scale installed): `export nnUNet_results=<export>/nnunet` then",
        f"`nnUNetv2_predict -i IN -o OUT -d {export_info.get('nnunet_dataset_id', '...')} -c 3d_fullres -f 0`.",
        "",
        "## License",
        "",
        f"Front matter license: `{license_id}`. Weights inherit the terms of the data they were trained on:",
        "check the license of every dataset in the run before redistributing (TotalSegmentator: cite",
        "Wasserthal et al., Radiology: AI 2023, and follow its Zenodo record's license)."
        + (" For weights from the STU-Net release, also follow uni-medical/STU-Net's terms." if released else ""),
        "",
        "## Files (sha256)",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| {name} | `{digest}` |" for name, digest in sorted(files.items())],
        "",
        f"Exported by stunet-scale {export_info.get('stunet_scale_version', '')} from `{export_info.get('source', '')}`.",
        "",
    ]
    return "\n".join(lines)


CROP_TEXT = {
    "body": "z-score statistics over the resampled bounding box of voxels > -500 HU (the body; data.normalization=zscore_stored, not reproducible in nnU-Net); outside it is background",
    "nonzero": "statistics over the bounding box of nonzero voxels of the original image, before resampling (nnU-Net, the STU-Net release); for CT the whole image",
    "none": "statistics over the whole image",
}

AXIS_TEXT = {
    "ras_xyz": "reoriented to RAS, array axes (x, y, z) (stunet-scale's training convention; not a transfer file convention)",
    "ras_zyx": "reoriented to RAS, array axes (z, y, x): SimpleITK / nnU-Net order of a RAS file, the convention of the released STU-Net checkpoints; conv kernels, pool strides, spacing and patch are all in this order",
}
