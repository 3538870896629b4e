"""The STU-Net model zoo: one plain-PyTorch module, four presets that are data, not subclasses.

``model_config`` (the architecture as data) imports no torch; the rest is loaded on first use
(module ``__getattr__``), so ``import stunet_scale.models.model_config`` and the run configuration
stay torch-free.
"""

from .model_config import PRESETS, RELEASE_NAMES, ModelConfig


def __getattr__(name: str):
    # Written out (not a name -> module table) so readers and the import-graph test see the edges.
    if name in ("STUNet", "build_stunet", "init_weights_he"):
        from . import stunet

        return getattr(stunet, name)
    if name in ("count_parameters", "forward_flops", "preset_table", "train_step_flops"):
        from . import flops

        return getattr(flops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRESETS", "RELEASE_NAMES", "ModelConfig", "STUNet", "build_stunet", "init_weights_he",
    "count_parameters", "forward_flops", "preset_table", "train_step_flops",
]
