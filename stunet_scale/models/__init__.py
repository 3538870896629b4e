"""The STU-Net model zoo: one plain-PyTorch module, four presets that are data, not subclasses."""

from .flops import count_parameters, forward_flops, preset_table, train_step_flops
from .stunet import PRESETS, RELEASE_NAMES, ModelConfig, STUNet, build_stunet, init_weights_he

__all__ = [
    "PRESETS", "RELEASE_NAMES", "ModelConfig", "STUNet", "build_stunet", "init_weights_he",
    "count_parameters", "forward_flops", "preset_table", "train_step_flops",
]
