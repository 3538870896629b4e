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
(x) axis only in the fifth down-sampling (``[[2,2,2]]*4 + [[1,1,2]]``, stunet_recipe.md §1.1).
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

# What the STU-Net release was trained with (stunet_recipe.md §1.1, §1.4, §2): plans.pkl of *_ep4k.model.
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
    normalization: str = "zscore"  # zscore = per-image z-score (STU-Net "nonCT"); ct = nnU-Net CT clip + global z-score
    intensity_stats: dict | None = None  # for "ct": mean, std, percentile_00_5, percentile_99_5 (foreground HU)
    image_interpolation: str = "cubic"  # image resampling: cubic (order-3 spline, nnU-Net) or linear
    crop: str = "body"  # region the z-score statistics cover: body (> -500 HU bbox, our stores), nonzero (nnU-Net), none
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
    def from_dict(cls, data: dict) -> "ModelSpec":
        data = dict(data)
        fmt = data.pop("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise ValueError(f"model spec format {fmt!r} is not {SPEC_FORMAT!r}; upgrade stunet-scale")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown model spec keys {sorted(unknown)}")
        return cls(**data)

    def with_heads(self, num_classes: int, in_channels: int | None = None) -> "ModelSpec":
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


def labels_for(class_map: str | None, num_classes: int, manifest: dict | None = None) -> tuple[list[str], str | None, str | None]:
    """Label names for ``num_classes`` outputs: from the store's manifest, else the named class map."""
    from ..data.class_maps import CLASS_MAP_FILES, load_class_map

    if manifest:
        names = _manifest_labels(manifest)
        if names and len(names) == num_classes:
            cm = manifest.get("class_map")
            cm_name = cm if isinstance(cm, str) else (cm or {}).get("name") if isinstance(cm, dict) else None
            version = CLASS_MAP_FILES[cm_name][1] if cm_name in CLASS_MAP_FILES else None
            return names, cm_name, version  # a custom name too (e.g. "dataset.json" of an nnU-Net dataset)
    if class_map in CLASS_MAP_FILES:
        cm = load_class_map(class_map)
        if cm.num_outputs == num_classes:
            return list(cm.labels), cm.name, cm.totalseg_version
    return generic_labels(num_classes), None, None


def _manifest_labels(manifest: dict) -> list[str] | None:
    # The store's manifest records its label map; accept {"0": "background", ...}, a list, or
    # {"name": ..., "labels": ...} (the prepare step's exact layout may grow, the meaning does not).
    for value in (manifest.get("labels"), (manifest.get("class_map") or {}).get("labels")
                  if isinstance(manifest.get("class_map"), dict) else None):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, dict):
            try:
                if all(isinstance(v, int) for v in value.values()):  # nnU-Net style name -> id
                    inv = {int(v): str(k) for k, v in value.items()}
                else:
                    inv = {int(k): str(v) for k, v in value.items()}
            except (TypeError, ValueError):
                continue
            if sorted(inv) == list(range(len(inv))):
                return [inv[i] for i in range(len(inv))]
    return None


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
    """Dataset foreground HU statistics for nnU-Net CT normalisation, if the manifest has them."""
    if not manifest:
        return None
    needed = ("mean", "std", "percentile_00_5", "percentile_99_5")
    candidates = [manifest.get("intensity_stats"), manifest.get("intensity"), manifest.get("foreground_intensity")]
    for c in list(candidates):
        if isinstance(c, dict):
            candidates += [v for v in c.values() if isinstance(v, dict)]
    for c in candidates:
        if isinstance(c, dict) and all(k in c for k in needed):
            return {k: float(c[k]) for k in needed}
    return None


def spec_from_train_config(cfg: dict, *, training: dict | None = None, manifest: dict | None = None) -> ModelSpec:
    """Spec of a model trained by ``stunet-scale train`` with resolved config ``cfg`` (a plain dict)."""
    model = ModelConfig(**cfg["model"]).resolved()
    data, aug = cfg.get("data", {}), cfg.get("augmentation", {})
    if manifest is None:
        manifest = read_manifest(data.get("root"))
    labels, class_map, version = labels_for(data.get("class_map"), model.num_classes, manifest)
    normalization = data.get("normalization", "zscore")
    stats = manifest_intensity_stats(manifest) if normalization == "ct" else None
    if normalization == "ct" and stats is None:
        raise ValueError(
            f"the run used data.normalization=ct but the dataset statistics were not found "
            f"({Path(data.get('root', '?')) / 'manifest.json'}); pass --manifest PATH to the prepared store's manifest.json"
        )
    pre = (manifest or {}).get("preprocessing") or {}
    mirror_axes = list(aug.get("mirror_axes", [0, 1, 2])) if aug.get("mirror", True) and aug.get("enabled", True) else []
    return ModelSpec(
        model=_plain(dataclasses.asdict(model)),
        spacing=[float(s) for s in data.get("spacing", [1.5, 1.5, 1.5])],
        patch_size=[int(p) for p in data.get("patch_size", [128, 128, 128])],
        normalization=normalization,
        intensity_stats=stats,
        image_interpolation=_choice(pre, ("image_interpolation", "interpolation", "image_method"), INTERPOLATIONS, "cubic"),
        crop=_choice(pre, ("crop", "crop_mode"), CROPS, "body"),
        axis_order="ras_xyz",
        labels=labels,
        class_map=class_map,
        totalseg_version=version,
        mirror_axes=mirror_axes,
        origin="stunet-scale",
        training=_plain(training or {}),
        train_config=_plain(cfg),
    )


def _choice(section: dict, keys: tuple[str, ...], allowed: tuple[str, ...], default: str) -> str:
    # The prepare step records how it resampled and cropped; fall back to its defaults.
    for key in keys:
        value = section.get(key)
        if value is not None:
            value = {"trilinear": "linear"}.get(str(value).lower(), str(value).lower())
            if value in allowed:
                return value
    return default


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
