"""STU-Net with nnU-Net v2's network constructor signature, named by our exported ``plans.json``.

Stock nnU-Net v2 builds networks in ``get_network_from_plans`` as
``pydoc.locate(network_class_name)(input_channels=..., num_classes=..., **arch_kwargs)`` with
``deep_supervision`` among the kwargs, and toggles ``network.decoder.deep_supervision``. This
subclass only translates that call into a ``ModelConfig``; modules and state-dict keys are
``STUNet``'s, so the released key names are what ``checkpoint_final.pth`` holds. No ``initialize``
method: nnU-Net would call it on fresh networks only, and ``STUNet`` already applies He init.

Kept import-light (torch + the model file) because nnU-Net imports it by name at predict time.
"""

from __future__ import annotations

from ..models.stunet import ModelConfig, STUNet

NETWORK_CLASS_NAME = "stunet_scale.export.nnunet_network.STUNetForNNUNet"


class STUNetForNNUNet(STUNet):
    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs):
        super().__init__(ModelConfig(in_channels=int(input_channels), num_classes=int(num_classes),
                                     deep_supervision=bool(deep_supervision), **arch_kwargs))
