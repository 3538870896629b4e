"""stunet-scale: pretrain STU-Net foundation models for 3D medical image segmentation at cluster scale."""

__version__ = "0.1.0"
