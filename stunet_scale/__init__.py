"""stunet-scale: pretrain STU-Net foundation models for 3D medical image segmentation at cluster scale."""

from .version import __version__


def __getattr__(name: str):
    # Lazy, so `import stunet_scale` (and `stunet-scale --help`) does not import torch.
    if name == "load_pretrained":
        from .export.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'stunet_scale' has no attribute {name!r}")


__all__ = ["__version__", "load_pretrained"]
