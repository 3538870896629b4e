"""A synthetic stand-in for ``stunet_scale.data.loader`` (tests only).

Same interface and the same determinism contract as the real stream: sample ``g`` of the plan is a
pure function of ``(seed, g)``; rank ``r`` of ``W`` takes positions ``r*b .. r*b+b-1`` of each global
batch (b = global_batch / W), split into micro-batches. Images are spheres whose intensity encodes
their class, so a tiny STU-Net learns them in a few dozen steps.
"""

from __future__ import annotations

import numpy as np
import torch

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


def targets_for(label: torch.Tensor, pool_strides) -> list[torch.Tensor]:
    out, scale = [label], [1, 1, 1]
    for stride in pool_strides[:-1]:
        scale = [a * b for a, b in zip(scale, stride)]
        out.append(label[..., :: scale[0], :: scale[1], :: scale[2]])
    return out


class SyntheticStream:
    def __init__(self, cfg, rank, world_size, start_step, device):
        self.cfg, self.rank, self.world, self.step, self.device = cfg, rank, world_size, start_step, device
        s = cfg.schedule
        self.per_rank = s.global_batch // world_size
        self.micro = s.micro_batch

    def __iter__(self):
        cfg = self.cfg
        while True:
            step = self.step
            base = step * cfg.schedule.global_batch + self.rank * self.per_rank
            micro_batches = []
            for m0 in range(0, self.per_rank, self.micro):
                idx = list(range(base + m0, base + m0 + self.micro))
                imgs, labs = zip(*(make_sample(cfg.seed, g, cfg.data.patch_size, cfg.model.num_classes) for g in idx))
                image = torch.from_numpy(np.stack(imgs)).to(self.device)
                label = torch.from_numpy(np.stack(labs))[:, None].to(self.device)
                micro_batches.append({
                    "image": image,
                    "targets": targets_for(label, cfg.model.pool_strides),
                    "sample_index": torch.tensor(idx, dtype=torch.int64),
                })
            self.step += 1
            yield step, micro_batches

    def state_dict(self):
        return {"seed": self.cfg.seed, "step": self.step}

    def close(self):
        pass


def build_train_stream(cfg, *, rank, world_size, start_step, device):
    return SyntheticStream(cfg, rank, world_size, start_step, device)


def list_validation_cases(cfg):
    return [f"val{i}" for i in range(len(VAL_SHAPES))]


def load_validation_case(cfg, case_id):
    i = int(case_id[3:])
    image, label = _phantom(np.random.default_rng([cfg.seed, 10_000 + i]), VAL_SHAPES[i], cfg.model.num_classes)
    return image, label, {"case_id": case_id}
