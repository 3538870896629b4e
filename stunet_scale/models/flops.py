"""Parameter and FLOP counts, measured on the meta device (no memory, no compute).

FLOPs are counted by ``torch.utils.flop_counter`` while the real module runs on meta tensors,
so they follow the architecture instead of a formula that can drift from it. The counter
reports 2 x multiply-accumulates of convolutions without bias, which is the convention of the
reference table (STU-Net's README quotes MACs, i.e. half of these).
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from .stunet import ModelConfig, build_stunet


def _as_config(size_or_config: str | ModelConfig, **overrides) -> ModelConfig:
    cfg = size_or_config if isinstance(size_or_config, ModelConfig) else ModelConfig(size=size_or_config)
    return replace(cfg, **overrides).resolved()


def count_parameters(size_or_config: str | ModelConfig, **overrides) -> int:
    with torch.device("meta"):
        model = build_stunet(_as_config(size_or_config, **overrides))
    return sum(p.numel() for p in model.parameters())


def forward_flops(
    size_or_config: str | ModelConfig,
    patch_size: tuple[int, int, int] = (128, 128, 128),
    batch_size: int = 1,
    **overrides,
) -> int:
    """Forward FLOPs of one batch. Deep supervision heads included (they run in training)."""
    return _forward_flops_cached(_as_config(size_or_config, **overrides), tuple(patch_size), batch_size)


def _config_key(cfg: ModelConfig) -> tuple:
    # ModelConfig holds lists, so it is not hashable; this is its identity for the cache.
    return (cfg.base_width, tuple(cfg.blocks_per_stage), tuple(cfg.width_multipliers), cfg.in_channels,
            cfg.num_classes, tuple(map(tuple, cfg.pool_strides)), tuple(map(tuple, cfg.kernel_sizes)),
            cfg.deep_supervision)


_cache: dict[tuple, int] = {}  # counting H takes ~1 s on meta; info/plan/bench ask repeatedly


def _forward_flops_cached(cfg: ModelConfig, patch_size: tuple[int, int, int], batch_size: int) -> int:
    key = (_config_key(cfg), patch_size, batch_size)
    if key not in _cache:
        with torch.device("meta"):
            model = build_stunet(cfg)
            x = torch.empty(batch_size, cfg.in_channels, *patch_size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        _cache[key] = int(counter.get_total_flops())
    return _cache[key]


def train_step_flops(size_or_config: str | ModelConfig, patch_size=(128, 128, 128), batch_size: int = 1, **overrides) -> int:
    """Model FLOPs of forward + backward (3x forward, the usual MFU numerator; recompute not counted)."""
    return 3 * forward_flops(size_or_config, patch_size, batch_size, **overrides)


@cache
def preset_table() -> dict[str, dict[str, int]]:
    """Params and forward FLOPs per 1x1x128^3 patch for S/B/L/H, 1 input channel, 105 classes."""
    from .stunet import PRESETS

    return {
        size: {"params": count_parameters(size), "forward_flops_per_128cube_patch": forward_flops(size)}
        for size in PRESETS
    }
