"""How the plain STU-Net module is wrapped for training: activation checkpointing and backends."""

from .activation_checkpointing import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing"]
