"""STU-Net (Huang et al. 2023, arXiv 2304.06716): a residual 3D U-Net scaled in depth and width together.

Plain PyTorch on purpose: no DeepSpeed, no accelerate, nothing distributed. Activation
checkpointing, sharding and compilation are applied from outside (``stunet_scale.parallel``),
so one module serves DeepSpeed, FSDP2, DDP and single-process training alike.

The module layout reproduces the released checkpoints key for key (``conv_blocks_context``,
``upsample_layers``, ``conv_blocks_localization``, ``seg_outputs``), so weights from the STU-Net
release load with ``load_state_dict(strict=True)``. That contract is pinned by
``tests/contracts/stunet_released_state_dicts.json``; change a name here and that test fails.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .model_config import PRESETS, RELEASE_NAMES, ModelConfig  # noqa: F401 - re-exported for callers of the model


class BasicResBlock(nn.Module):
    """conv-norm-act-conv-norm plus a shortcut (1x1x1 conv when shape changes), then act.

    Every conv keeps its bias although a norm follows: the released weights have those biases.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: list[int], stride: list[int] | int = 1, use_1x1conv: bool = False):
        super().__init__()
        padding = [k // 2 for k in kernel]
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=padding)
        self.norm1 = nn.InstanceNorm3d(out_ch, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, kernel, padding=padding)
        self.norm2 = nn.InstanceNorm3d(out_ch, affine=True)
        self.act2 = nn.LeakyReLU(inplace=True)
        # The shortcut conv carries the stride too, so down-sampling costs no extra pooling op.
        self.conv3 = nn.Conv3d(in_ch, out_ch, 1, stride=stride) if use_1x1conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.conv3(x) if self.conv3 is not None else x
        return self.act2(y + shortcut)


class UpsampleNearest(nn.Module):
    """STU-Net's weight-free up-sampling: nearest interpolation, then a 1x1x1 conv to the skip width.

    The state-dict key is ``upsample_layers.N.conv.*`` as in the release.
    """

    def __init__(self, in_ch: int, out_ch: int, scale: list[int]):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 1)
        self.scale = tuple(float(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


def _stage(in_ch: int, out_ch: int, blocks: int, kernel: list[int], stride: list[int] | int) -> nn.Sequential:
    # The first block changes width (and resolution); it gets the 1x1x1 shortcut. The rest keep shape.
    first = BasicResBlock(in_ch, out_ch, kernel, stride=stride, use_1x1conv=True)
    return nn.Sequential(first, *[BasicResBlock(out_ch, out_ch, kernel) for _ in range(blocks - 1)])


class _DecoderFlag(nn.Module):
    """No parameters. nnU-Net v2 toggles ``network.decoder.deep_supervision``; this is where that lands."""

    def __init__(self, owner: STUNet):
        super().__init__()
        self._owner = [owner]  # a list so the owner is not registered as a child (no cycle in modules())

    @property
    def deep_supervision(self) -> bool:
        return self._owner[0].deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self._owner[0].deep_supervision = bool(value)


class STUNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.resolved()
        self.config = cfg
        widths = [cfg.base_width * m for m in cfg.width_multipliers]
        blocks, kernels, strides = cfg.blocks_per_stage, cfg.kernel_sizes, cfg.pool_strides
        num_pool = len(strides)
        self.deep_supervision = cfg.deep_supervision

        self.conv_blocks_context = nn.ModuleList(
            [_stage(cfg.in_channels, widths[0], blocks[0], kernels[0], 1)]
            + [_stage(widths[d - 1], widths[d], blocks[d], kernels[d], strides[d - 1]) for d in range(1, num_pool + 1)]
        )
        # Decoder index u runs from the bottleneck up: u=0 is the lowest resolution.
        skip = [num_pool - 1 - u for u in range(num_pool)]  # stage whose skip decoder u consumes
        self.upsample_layers = nn.ModuleList(
            [UpsampleNearest(widths[s + 1], widths[s], strides[s]) for s in skip]
        )
        self.conv_blocks_localization = nn.ModuleList(
            [_stage(2 * widths[s], widths[s], blocks[s], kernels[s], 1) for s in skip]
        )
        self.seg_outputs = nn.ModuleList([nn.Conv3d(widths[s], cfg.num_classes, 1) for s in skip])
        self.decoder = _DecoderFlag(self)
        self.apply(init_weights_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        logits = []
        for u, (up, stage, head) in enumerate(zip(self.upsample_layers, self.conv_blocks_localization, self.seg_outputs)):
            x = stage(torch.cat((up(x), skips[-(u + 1)]), dim=1))
            # Heads on coarse stages are only needed for deep supervision; skip them otherwise.
            if self.deep_supervision or u == len(self.seg_outputs) - 1:
                logits.append(head(x))
        if not self.deep_supervision:
            return logits[-1]
        return tuple(reversed(logits))  # full resolution first, as nnU-Net's loss expects

    def checkpoint_units(self, granularity: str) -> list[nn.Module]:
        """Modules that activation checkpointing may wrap: every residual block, or every stage."""
        stages = list(self.conv_blocks_context) + list(self.conv_blocks_localization)
        if granularity == "stage":
            return stages
        if granularity == "block":
            return [block for stage in stages for block in stage]
        raise ValueError(f"granularity must be 'block' or 'stage', got {granularity!r}")

    def head_keys(self) -> list[str]:
        return [k for k in self.state_dict() if k.startswith("seg_outputs.")]

    def encoder_keys(self) -> list[str]:
        return [k for k in self.state_dict() if k.startswith("conv_blocks_context.")]


def init_weights_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's InitWeights_He: Kaiming normal (a=0.01) for convs, zero bias. Norms keep 1/0."""
    if isinstance(module, (nn.Conv3d, nn.Conv2d, nn.ConvTranspose3d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_stunet(size_or_config: str | ModelConfig = "B", in_channels: int = 1, num_classes: int = 105, **overrides) -> STUNet:
    """Build an STU-Net from a preset name ("S"/"B"/"L"/"H") or a ModelConfig.

    Works under ``with torch.device("meta"):`` for counting parameters and FLOPs without memory.
    ``overrides`` are ModelConfig fields (e.g. ``deep_supervision=False``, ``pool_strides=...``).
    """
    if isinstance(size_or_config, ModelConfig):
        cfg = replace(size_or_config, **overrides)
        # Explicit arguments win only when the caller changed them from the defaults.
        if in_channels != 1:
            cfg = replace(cfg, in_channels=in_channels)
        if num_classes != 105:
            cfg = replace(cfg, num_classes=num_classes)
    elif isinstance(size_or_config, str):
        cfg = ModelConfig(size=size_or_config, in_channels=in_channels, num_classes=num_classes, **overrides)
    else:
        raise TypeError(f"size_or_config must be 'S'/'B'/'L'/'H' or a ModelConfig, got {type(size_or_config).__name__}")
    return STUNet(cfg)
