"""A synthetic stand-in for the prepared store's data source (tests only).

It implements ``stunet_scale.data.stream.source.DataSource``, as ``StoreDataSource`` does, and takes
its samples by the real indexing (``plan.micro_batch_indices``: rank r of W takes positions
r, r + W, ... of each global batch, split into micro-batches) and its deep-supervision targets by the
real down-sampling (``patch_geometry.downsample_target`` at ``deep_supervision_strides``), so it
cannot drift from the real loader. Sample ``g`` is a pure function of ``(seed, g)``. Images are
spheres whose intensity encodes their class, so a tiny STU-Net learns them in a few dozen steps.
"""

from __future__ import annotations

import numpy as np
import torch

from stunet_scale.config import StreamConfig, micro_batches_per_rank
from stunet_scale.data.stream.patch_geometry import deep_supervision_strides, downsample_target
from stunet_scale.data.stream.plan import micro_batch_indices

VAL_SHAPES = [(40, 36, 44), (32, 32, 32), (48, 40, 36)]


def _phantom(rng: np.random.Generator, shape, num_classes: int):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0).astype(np.float32)
    image = rng.normal(0, 0.3, size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.int64)
    for _ in range(3):
        c = int(rng.integers(1, min(num_classes, 4)))
        centre = np.array([rng.uniform(0.25 * s, 0.75 * s) for s in shape], dtype=np.float32)
        radius = rng.uniform(0.15, 0.3) * min(shape)
        mask = ((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2
        label[mask] = c
        image[mask] += 1.0 + c
    return image[None], label


def make_sample(seed: int, g: int, patch, num_classes: int):
    return _phantom(np.random.default_rng([seed, g]), tuple(patch), num_classes)


def targets_for(label: torch.Tensor, pool_strides, deep_supervision: bool = True) -> list[torch.Tensor]:
    """The loader's deep-supervision targets of a full-resolution label batch."""
    return [downsample_target(label, s) for s in deep_supervision_strides(pool_strides, deep_supervision)]


class SyntheticStream:
    def __init__(self, cfg: StreamConfig, rank: int, world_size: int, start_step: int, device):
        self.cfg, self.rank, self.world, self.step, self.device = cfg, rank, world_size, start_step, device
        self.accumulation = micro_batches_per_rank(cfg.global_batch, cfg.micro_batch, world_size)

    def __iter__(self):
        cfg = self.cfg
        while True:
            step = self.step
            micro_batches = []
            for micro in range(self.accumulation):
                idx = micro_batch_indices(cfg.global_batch, step, self.rank, self.world, micro, cfg.micro_batch)
                imgs, labs = zip(*(make_sample(cfg.seed, g, cfg.data.patch_size, cfg.num_classes) for g in idx))
                image = torch.from_numpy(np.stack(imgs)).to(self.device)
                label = torch.from_numpy(np.stack(labs))[:, None].to(self.device)
                micro_batches.append({
                    "image": image,
                    "targets": targets_for(label, cfg.pool_strides, cfg.deep_supervision),
                    "sample_index": torch.tensor(idx, dtype=torch.int64),
                })
            self.step += 1
            yield step, micro_batches

    def state_dict(self):
        return {"seed": self.cfg.seed, "step": self.step}

    def close(self):
        pass


class SyntheticDataSource:
    """``DataSource`` over synthetic phantoms; pass the class as the trainer's ``data`` factory."""

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg

    def train_stream(self, *, rank, world_size, start_step, device):
        return SyntheticStream(self.cfg, rank, world_size, start_step, device)

    def validation_case_ids(self):
        return [f"val{i}" for i in range(len(VAL_SHAPES))]

    def validation_case_shape(self, case_id):
        return VAL_SHAPES[int(case_id[3:])]

    def validation_case(self, case_id):
        i = int(case_id[3:])
        image, label = _phantom(np.random.default_rng([self.cfg.seed, 10_000 + i]), VAL_SHAPES[i], self.cfg.num_classes)
        return image, label, {"case_id": case_id}


class CasesDataSource:
    """``DataSource`` over given in-memory validation cases ``{case_id: (image [C,X,Y,Z], label, meta)}``
    (validation tests; it has no training stream)."""

    def __init__(self, cases: dict):
        self.cases = cases

    def train_stream(self, *, rank, world_size, start_step, device):
        raise NotImplementedError("validation-only stand-in")

    def validation_case_ids(self):
        return sorted(self.cases)

    def validation_case_shape(self, case_id):
        return tuple(self.cases[case_id][1].shape)

    def validation_case(self, case_id):
        return self.cases[case_id]
