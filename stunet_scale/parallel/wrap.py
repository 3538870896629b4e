"""The one place a plain STU-Net module meets its training backend (``distributed.backend``).

Separate from ``backend.py`` (the ``Backend`` interface and the torch backends) because the
DeepSpeed and FSDP2 backends build on that interface: choosing among them here keeps the
imports one-way.
"""

from __future__ import annotations

from torch import nn

from ..config import ConfigError
from .backend import Backend, TorchBackend, prepare_module
from .deepspeed_engine import DeepSpeedBackend
from .distributed import DistEnv
from .fsdp2 import FSDP2Backend


def build_backend(module: nn.Module, cfg, env: DistEnv, grad_accumulation: int) -> Backend:
    """Wrap ``module`` (already initialised or loaded) for ``cfg.distributed.backend``."""
    kind = cfg.distributed.backend
    prepare_module(module, cfg.distributed)
    if kind == "none":
        if env.world_size > 1:
            raise ConfigError(
                f"distributed.backend=none runs one process but {env.world_size} were launched; "
                "set distributed.backend=ddp, fsdp2 or deepspeed"
            )
        return TorchBackend(module, cfg, env, grad_accumulation, ddp=False)
    if kind == "ddp":
        return TorchBackend(module, cfg, env, grad_accumulation, ddp=True)
    if kind == "fsdp2":
        return FSDP2Backend(module, cfg, env, grad_accumulation)
    if kind == "deepspeed":
        return DeepSpeedBackend(module, cfg, env, grad_accumulation)
    raise ValueError(f"unknown distributed.backend {kind!r}")
