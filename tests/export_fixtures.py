"""Builders shared by the export / load_pretrained / predict tests: tiny STU-Nets with a spec, NIfTI phantoms."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from stunet_scale.config import TrainConfig, to_dict
from stunet_scale.export.spec import ModelSpec, spec_from_train_config
from stunet_scale.models import ModelConfig, STUNet

# Five down-samplings, the last with stride 1, so a 32^3 patch keeps a 2^3 bottleneck: a 0.2M-parameter
# STU-Net that runs a sliding window over a small CT in well under a second on one CPU core.
TINY_MODEL = dict(size=None, base_width=2, blocks_per_stage=1,
                  pool_strides=[[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 1]])
TINY_LABELS = ["background", "liver", "spleen", "kidney_left"]


def tiny_train_config(**model) -> dict:
    cfg = to_dict(TrainConfig())
    cfg["model"] = dataclasses.asdict(ModelConfig(**{**TINY_MODEL, "num_classes": len(TINY_LABELS), **model}).resolved())
    cfg["data"].update(patch_size=[32, 32, 32], spacing=[2.0, 2.0, 2.0], root="/nonexistent/store")
    cfg["augmentation"]["mirror_axes"] = [0, 1]
    return cfg


def tiny_spec(**model) -> ModelSpec:
    manifest = {"class_map": {"name": "custom", "labels": TINY_LABELS}}
    training = {"steps": 120, "samples_seen": 240, "epoch": 2.4, "git_revision": "0123abcd",
                "validation": {"dice_per_class": {"liver": 0.91, "spleen": 0.8, "kidney_left": 0.77}, "cases": 3}}
    return spec_from_train_config(tiny_train_config(**model), training=training, manifest=manifest)


def tiny_state_dict(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = STUNet(spec.model_config)
    # Non-zero biases everywhere, so a bias that is lost or re-initialised is visible in comparisons.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
        # Whiten the full-resolution head on noise input: a random STU-Net otherwise predicts one class
        # everywhere, and a test comparing two predictors on a constant map proves nothing.
        model.deep_supervision = False
        y = model(torch.randn(2, spec.in_channels, 32, 32, 32))
        mean, std = y.mean((0, 2, 3, 4)), y.std((0, 2, 3, 4))
        head = model.seg_outputs[-1]
        head.weight /= std.view(-1, 1, 1, 1, 1)
        head.bias.copy_((head.bias - mean) / std)
        model.deep_supervision = True
    return model.state_dict()


def write_source(path: Path, spec: ModelSpec | None = None, seed: int = 0) -> tuple[Path, dict, ModelSpec]:
    """A weights file of ours (nnU-Net v2 layout + spec), standing in for a consolidated training checkpoint."""
    spec = spec or tiny_spec()
    sd = tiny_state_dict(spec, seed)
    torch.save({"network_weights": sd, "stunet_scale_spec": spec.to_dict()}, path)
    return path, sd, spec


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[j, j], r[i, j], r[j, i] = c, c, -s, s
    return r


def oblique_lps_affine(spacing=(0.9, 1.2, 4.0), origin=(30.0, -20.0, 10.0)) -> np.ndarray:
    """Voxel axes pointing Left, Posterior, Superior (DICOM's LPS), tilted 20 and 10 degrees, anisotropic."""
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation(2, 20) @ rotation(0, 10) @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def ellipsoid_phantom(shape, affine, centre_voxel, radii_mm, inside=350.0, outside=50.0):
    """(image, mask) with an off-centre ellipsoid defined in physical space (so any flip shows)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ np.asarray(centre_voxel, float) + affine[:3, 3]
    mask = ((((xyz - centre) / np.asarray(radii_mm)) ** 2).sum(1) <= 1).reshape(shape)
    return np.where(mask, inside, outside).astype(np.float32), mask
