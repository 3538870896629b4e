"""What a set of STU-Net weights needs beside the tensors to be used correctly: ``ModelSpec``.

Weights alone do not say how to feed the network. Every export carries one ``ModelSpec`` (as
``config.json``, inside the torch files under ``stunet_scale_spec``, and translated into nnU-Net's
``plans.json``), and ``predict`` / ``load_pretrained`` read it back:

* architecture: the resolved ``ModelConfig`` (pool strides are not recoverable from the weights:
  STU-Net's weight shapes are independent of strides, which is what makes them transferable);
* preprocessing: voxel spacing, patch size, intensity normalisation (+ its statistics), image
  interpolation order, and the voxel axis order the network was trained on;
* labels: the name of every output channel, the class map and its TotalSegmentator version;
* provenance: steps, samples, git revision, the full resolved training config.

Axis order. Our prepared stores hold RAS-reoriented volumes with numpy axes (x, y, z)
(``data_shards/README.md``): ``axis_order="ras_xyz"``. The released STU-Net models were trained by
nnU-Net v1, which reads images with SimpleITK: numpy axes (z, y, x) of the file's voxel grid, and
TotalSegmentator ships RAS files, so they saw ``axis_order="ras_zyx"``; their plans pool the last
(x) axis only in the fifth down-sampling (``[[2,2,2]]*4 + [[1,1,2]]``, the release's plans.pkl).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.stunet import ModelConfig

SPEC_FORMAT = "stunet-scale-model/1"
AXIS_ORDERS = ("ras_xyz", "ras_zyx")
NORMALIZATIONS = ("zscore", "ct")
CROPS = ("body", "nonzero", "none")
INTERPOLATIONS = ("cubic", "linear")

# What the STU-Net release was trained with: the plans.pkl next to its *_ep4k.model checkpoints.
RELEASED_POOL_STRIDES = [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]]
RELEASED_SPACING = [1.5, 1.5, 1.5]
RELEASED_PATCH = [128, 128, 128]
RELEASED_EPOCHS = 4000


@dataclass
class ModelSpec:
    """Everything besides the tensors that a consumer of the weights needs (see module docstring)."""

    model: dict  # resolved ModelConfig fields (size, base_width, blocks_per_stage, ..., num_classes)
    spacing: list[float]  # mm per voxel, in the network's axis order
    patch_size: list[int]  # training patch, network axis order
    normalization: str = "zscore"  # zscore = per-image z-score (STU-Net "nonCT", statistics over ``crop``); ct = nnU-Net CT clip + global z-score
    intensity_stats: dict | None = None  # for "ct": mean, std, percentile_00_5, percentile_99_5 (foreground HU)
    image_interpolation: str = "cubic"  # image resampling: cubic (order-3 spline, nnU-Net) or linear
    crop: str = "nonzero"  # region of the original image the z-score statistics cover: nonzero (nnU-Net, default), body (> -500 HU bbox, data.normalization=zscore_stored), none
    axis_order: str = "ras_xyz"  # ras_xyz (our stores) or ras_zyx (nnU-Net/SimpleITK order; the STU-Net release)
    labels: list[str] = field(default_factory=list)  # labels[k] = name of output channel k (0 = background)
    class_map: str | None = None  # stunet, totalseg-v1, totalseg-v2, the store's own name, or None
    totalseg_version: str | None = None  # TotalSegmentator release the class names come from
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1, 2])  # axes flipped in training (safe for TTA)
    origin: str = "stunet-scale"  # "stunet-scale" (our training) or "stunet-release" (uni-medical's weights)
    training: dict = field(default_factory=dict)  # steps, samples_seen, epochs, git_revision, validation, ...
    train_config: dict | None = None  # the resolved TrainConfig of the run, when known

    def __post_init__(self) -> None:
        if self.axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {self.axis_order!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.image_interpolation not in INTERPOLATIONS:
            raise ValueError(f"image_interpolation must be one of {INTERPOLATIONS}, got {self.image_interpolation!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.normalization == "ct":
            needed = {"mean", "std", "percentile_00_5", "percentile_99_5"}
            if not self.intensity_stats or not needed <= set(self.intensity_stats):
                raise ValueError(f"normalization 'ct' needs intensity_stats with {sorted(needed)}")
        if len(self.spacing) != 3 or len(self.patch_size) != 3:
            raise ValueError("spacing and patch_size need 3 entries")
        n = self.num_classes
        if self.labels and len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} label names for {n} output channels")
        if not self.labels:
            self.labels = generic_labels(n)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model).resolved()

    @property
    def in_channels(self) -> int:
        return int(self.model["in_channels"])

    @property
    def num_classes(self) -> int:
        return int(self.model["num_classes"])

    def to_dict(self) -> dict:
        return {"format": SPEC_FORMAT, **_plain(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        data = dict(data)
        fmt = data.pop("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise ValueError(f"model spec format {fmt!r} is not {SPEC_FORMAT!r}; upgrade stunet-scale")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown model spec keys {sorted(unknown)}")
        return cls(**data)

    def with_heads(self, num_classes: int, in_channels: int | None = None) -> ModelSpec:
        """The spec after a head (and/or input) change: labels are only kept when the count matches."""
        model = dict(self.model, num_classes=int(num_classes))
        if in_channels is not None:
            model["in_channels"] = int(in_channels)
        same = num_classes == self.num_classes
        return dataclasses.replace(
            self, model=model, labels=list(self.labels) if same else generic_labels(num_classes),
            class_map=self.class_map if same else None, totalseg_version=self.totalseg_version if same else None,
        )


def generic_labels(num_classes: int) -> list[str]:
    return ["background"] + [f"class_{k}" for k in range(1, num_classes)]


def _plain(value: Any) -> Any:
    """JSON-able copy (tuples -> lists); what we embed in torch files must load with weights_only=True."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


# What ``stunet-scale prepare`` writes into a store's manifest.json (stunet_scale/data/ingest/prepare.py,
# ``finalize``) and the fields read here:
#   class_map:     {"name": str, "labels": [name of output k, ...], "num_classes": int, ...}
#   preprocessing: {"crop": body|nonzero|none, "image_interpolation": cubic|linear, "target_spacing": [...], ...}
#   intensity:     {"foreground": {"mean", "std", "percentile_00_5", "percentile_99_5", ...} | null}
#   stats:         {"splits": {split name: number of prepared cases}, ...}
# Any other layout is not a prepared store; it is not guessed at.
CT_STATS = ("mean", "std", "percentile_00_5", "percentile_99_5")


def labels_for(class_map: str | None, num_classes: int, manifest: dict | None = None) -> tuple[list[str], str | None, str | None]:
    """Label names for ``num_classes`` outputs: from the store's manifest, else the named class map."""
    from ..data.class_maps import CLASS_MAP_FILES, load_class_map

    cm = (manifest or {}).get("class_map")
    if isinstance(cm, dict):
        names = cm.get("labels")
        if isinstance(names, list) and len(names) == num_classes:
            cm_name = cm.get("name")
            version = CLASS_MAP_FILES[cm_name][1] if cm_name in CLASS_MAP_FILES else None
            return [str(n) for n in names], cm_name, version  # a custom name too (e.g. "dataset.json")
    if class_map in CLASS_MAP_FILES:
        loaded = load_class_map(class_map)
        if loaded.num_outputs == num_classes:
            return list(loaded.labels), loaded.name, loaded.totalseg_version
    return generic_labels(num_classes), None, None


def read_manifest(data_root: str | Path | None) -> dict | None:
    if not data_root:
        return None
    path = Path(data_root) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def manifest_intensity_stats(manifest: dict | None) -> dict | None:
    """Dataset foreground HU statistics for nnU-Net CT normalisation (``intensity.foreground``)."""
    fg = ((manifest or {}).get("intensity") or {}).get("foreground")
    if isinstance(fg, dict) and all(k in fg for k in CT_STATS):
        return {k: float(fg[k]) for k in CT_STATS}
    return None


def manifest_case_counts(manifest: dict | None, train_splits: list[str] | None) -> dict:
    """Prepared cases per split (``stats.splits``) and how many of them the run trained on."""
    splits = ((manifest or {}).get("stats") or {}).get("splits")
    if not isinstance(splits, dict):
        return {}
    counts = {str(k): int(v) for k, v in splits.items()}
    train = list(train_splits or ["train"])
    return {"cases_per_split": counts, "num_training_cases": sum(counts.get(s, 0) for s in train)}


def spec_from_train_config(cfg: dict, *, training: dict | None = None, manifest: dict | None = None) -> ModelSpec:
    """Spec of a model trained by ``stunet-scale train`` with resolved config ``cfg`` (a plain dict)."""
    model = ModelConfig(**cfg["model"]).resolved()
    data, aug = cfg.get("data", {}), cfg.get("augmentation", {})
    if manifest is None:
        manifest = read_manifest(data.get("root"))
    labels, class_map, version = labels_for(data.get("class_map"), model.num_classes, manifest)
    mode = data.get("normalization", "zscore")
    if mode == "zscore" and (manifest or {}).get("format_version") == 1:
        # Stores before format 2 had no nnU-Net statistics: "zscore" then meant the stored crop's.
        mode = "zscore_stored"
    # The spec says which statistics a consumer must compute: z-score over nnU-Net's nonzero box of
    # the original image (crop="nonzero", data.normalization=zscore) or over the stored crop
    # (zscore_stored: the store's crop, e.g. the body box; nnU-Net cannot reproduce that one).
    normalization = "ct" if mode == "ct" else "zscore"
    stats = manifest_intensity_stats(manifest) if normalization == "ct" else None
    if normalization == "ct" and stats is None:
        raise ValueError(
            f"the run used data.normalization=ct but the dataset statistics were not found "
            f"({Path(data.get('root', '?')) / 'manifest.json'}); pass --manifest PATH to the prepared store's manifest.json"
        )
    pre = (manifest or {}).get("preprocessing") or {}
    mirror_axes = list(aug.get("mirror_axes", [0, 1, 2])) if aug.get("mirror", True) and aug.get("enabled", True) else []
    # Counts recorded by the run itself win; the store's manifest fills them in otherwise.
    training = {**manifest_case_counts(manifest, data.get("train_splits")), **(training or {})}
    return ModelSpec(
        model=_plain(dataclasses.asdict(model)),
        spacing=[float(s) for s in data.get("spacing", [1.5, 1.5, 1.5])],
        patch_size=[int(p) for p in data.get("patch_size", [128, 128, 128])],
        normalization=normalization,
        intensity_stats=stats,
        # prepare's defaults (PrepareOptions) when a store predates the field
        image_interpolation=pre.get("image_interpolation") or "cubic",
        crop=(pre.get("crop") or "body") if mode == "zscore_stored" else "nonzero",
        axis_order="ras_xyz",
        labels=labels,
        class_map=class_map,
        totalseg_version=version,
        mirror_axes=mirror_axes,
        origin="stunet-scale",
        training=_plain(training),
        train_config=_plain(cfg),
    )


def released_spec(model: ModelConfig) -> ModelSpec:
    """Spec of a released STU-Net checkpoint (or any file without our metadata): the paper's setting."""
    from ..data.class_maps import load_class_map

    cfg = model.resolved()
    stunet = load_class_map("stunet")
    named = cfg.num_classes == stunet.num_outputs
    return ModelSpec(
        model=_plain(dataclasses.asdict(cfg)),
        spacing=list(RELEASED_SPACING),
        patch_size=list(RELEASED_PATCH),
        normalization="zscore",
        image_interpolation="cubic",
        crop="nonzero",  # nnU-Net v1 crops to the nonzero region (all of a CT) and z-scores that
        axis_order="ras_zyx",
        labels=list(stunet.labels) if named else generic_labels(cfg.num_classes),
        class_map="stunet" if named else None,
        totalseg_version=stunet.totalseg_version if named else None,
        mirror_axes=[0, 1, 2],
        origin="stunet-release",
        training={"epochs": RELEASED_EPOCHS} if named else {},
    )
