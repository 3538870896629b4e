"""The architecture of one STU-Net as data: ``ModelConfig`` and the four size presets.

Torch-free on purpose: the run configuration (``stunet_scale/config.py``), ``train --dry-run`` and
``stunet-scale config`` read it without importing the model code (``models/stunet.py``), which
builds the module from it. Each field's ``help`` is the comment ``config.to_yaml`` writes next to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# One size dial. Everything else about a preset follows from these two numbers:
# widths are base_width x [1, 2, 4, 8, 16, 16] and every stage (encoder and decoder) has
# blocks_per_stage residual blocks. Parameter counts match the released S/B/L/H exactly.
PRESETS: dict[str, dict[str, int]] = {
    "S": {"base_width": 16, "blocks_per_stage": 1},  # 14,596,941 params
    "B": {"base_width": 32, "blocks_per_stage": 1},  # 58,262,669 params
    "L": {"base_width": 64, "blocks_per_stage": 2},  # 440,302,605 params
    "H": {"base_width": 96, "blocks_per_stage": 3},  # 1,457,326,221 params
}

# Names used by the STU-Net release (``small_ep4k.model`` ...), handy when reading their files.
RELEASE_NAMES = {"S": "small", "B": "base", "L": "large", "H": "huge"}


def _field(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: [list(v) if isinstance(v, list) else v for v in d],
                     metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Architecture of one STU-Net. ``size`` picks a preset; explicit fields override it."""

    size: str | None = _field("B", "preset S/B/L/H (widths 16/32/64/96 x [1,2,4,8,16,16], blocks 1/1/2/3); null = set base_width/blocks_per_stage")
    base_width: int | None = _field(None, "channels of stage 0; null = from the preset")
    blocks_per_stage: int | list[int] | None = _field(None, "residual blocks per stage (int or 6 ints); null = from the preset")
    width_multipliers: list[int] = _field([1, 2, 4, 8, 16, 16], "stage widths as multiples of base_width, one per stage (their count sets the stages; presets: six)")
    in_channels: int = _field(1, "input image channels (1 for CT)")
    num_classes: int = _field(105, "output channels incl. background (105 = STU-Net head on TotalSegmentator v1)")
    pool_strides: list[list[int]] = _field([[2, 2, 2]] * 5, "stride of each down-sampling between stages (one fewer than stages; presets: five), per axis (anisotropic allowed, e.g. [2,2,1])")
    kernel_sizes: list[list[int]] = _field([[3, 3, 3]] * 6, "conv kernel per stage, per axis (odd)")
    deep_supervision: bool = _field(True, "return one logit map per decoder stage for the deep-supervision loss")

    def resolved(self) -> ModelConfig:
        """A copy with preset values filled in and every field checked; raises naming the key."""
        base_width, blocks = self.base_width, self.blocks_per_stage
        if self.size is not None:
            size = str(self.size).upper()
            if size not in PRESETS:
                raise ValueError(f"model.size={self.size!r} is not a preset; use one of {sorted(PRESETS)} or null")
            base_width = PRESETS[size]["base_width"] if base_width is None else base_width
            blocks = PRESETS[size]["blocks_per_stage"] if blocks is None else blocks
        else:
            size = None
        if base_width is None or blocks is None:
            raise ValueError("model.size is null, so model.base_width and model.blocks_per_stage must both be set")
        stages = len(self.width_multipliers)
        if stages < 2:
            raise ValueError("model.width_multipliers needs at least 2 stages")
        if isinstance(blocks, int):
            blocks = [blocks] * stages
        blocks = list(blocks)
        if len(blocks) != stages or any(b < 1 for b in blocks):
            raise ValueError(f"model.blocks_per_stage must be one int >= 1 or {stages} of them, got {blocks}")
        if len(self.pool_strides) != stages - 1:
            raise ValueError(
                f"model.pool_strides needs {stages - 1} entries (one per down-sampling between {stages} stages), "
                f"got {len(self.pool_strides)}"
            )
        if len(self.kernel_sizes) != stages:
            raise ValueError(f"model.kernel_sizes needs {stages} entries (one per stage), got {len(self.kernel_sizes)}")
        for name, triples in (("pool_strides", self.pool_strides), ("kernel_sizes", self.kernel_sizes)):
            for t in triples:
                if len(t) != 3 or any(int(v) < 1 for v in t):
                    raise ValueError(f"model.{name} entries must be 3 positive ints, got {t}")
        if any(k % 2 == 0 for t in self.kernel_sizes for k in t):
            raise ValueError("model.kernel_sizes must be odd so 'same' padding keeps shapes")
        if self.in_channels < 1 or self.num_classes < 1 or base_width < 1:
            raise ValueError("model.in_channels, model.num_classes and model.base_width must be >= 1")
        return replace(
            self,
            size=size,
            base_width=int(base_width),
            blocks_per_stage=[int(b) for b in blocks],
            pool_strides=[[int(v) for v in t] for t in self.pool_strides],
            kernel_sizes=[[int(v) for v in t] for t in self.kernel_sizes],
        )

    @property
    def widths(self) -> list[int]:
        cfg = self.resolved()
        return [cfg.base_width * m for m in cfg.width_multipliers]

    @property
    def patch_divisor(self) -> list[int]:
        """A patch edge must be a multiple of this per axis (product of all pool strides)."""
        div = [1, 1, 1]
        for stride in self.resolved().pool_strides:
            div = [d * s for d, s in zip(div, stride)]
        return div


__all__ = ["PRESETS", "RELEASE_NAMES", "ModelConfig"]
