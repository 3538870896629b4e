"""Exports and transfer: checkpoint -> STU-Net / nnU-Net v2 / safetensors formats, and back into a model.

    stunet_scale.export.export(run_dir, "exports/b")                 # `stunet-scale export`
    model = stunet_scale.load_pretrained("exports/b", num_classes=14) # any export or released file
    report = initialize_from_pretrained(model, path)                  # the trainer's `checkpoint.init_from`

Modules: ``spec`` (what besides tensors a checkpoint needs), ``checkpoint_io`` (safe reading of
every format), ``pretrained`` (loading with head re-init / stem tiling), ``nnunet_folder`` +
``nnunet_network`` (nnU-Net v2 layouts), ``hf_bundle`` (safetensors + config + card),
``onnx_model`` (ONNX graph + onnxruntime runner, optional deps), ``exporter`` (the command).
Imports are lazy so ``import stunet_scale`` stays light.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "export": ".exporter",
    "FORMATS": ".exporter",
    "ExportResult": ".exporter",
    "load_pretrained": ".pretrained",
    "initialize_from_pretrained": ".pretrained",
    "LoadReport": ".pretrained",
    "read_weights": ".checkpoint_io",
    "CheckpointError": ".checkpoint_io",
    "UnsafeCheckpointError": ".checkpoint_io",
    "ModelSpec": ".spec",
    "export_onnx": ".onnx_model",
    "load_onnx_network": ".onnx_model",
}

__all__ = sorted(_LAZY)  # noqa: PLE0605 - the lazy names, listed once in _LAZY


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
