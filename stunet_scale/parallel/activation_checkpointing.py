"""Activation checkpointing applied from outside the model.

Why non-reentrant only: with reentrant checkpointing, a unit whose input does not require grad
(the first block sees the raw image) returns outputs without a grad_fn for its weights, so under
ZeRO-3 those weights silently never train (only a UserWarning). ``use_reentrant=False`` has no
such hole and composes with DeepSpeed, FSDP2 hooks and torch.compile.

Why patch ``forward`` instead of wrapping modules: a wrapper module renames every parameter
(``..._checkpoint_wrapped_module.conv1.weight``), which breaks the released-checkpoint key
contract and DeepSpeed's parameter names. Patching the instance's forward keeps the module tree
and the state dict untouched. The units (blocks or stages) own no parameters themselves, only
their children do, so hooks that gather parameters (ZeRO-3, FSDP2) still run on recompute.
"""

from __future__ import annotations

import types

from torch import nn
from torch.utils.checkpoint import checkpoint

GRANULARITIES = ("none", "block", "stage")


def apply_activation_checkpointing(model: nn.Module, granularity: str = "block") -> int:
    """Recompute activations of every residual block ("block") or stage ("stage") in backward.

    ``model`` is an STUNet (or anything with ``checkpoint_units(granularity)``). Returns the number of
    wrapped units. Applying twice is refused rather than nesting checkpoints.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"distributed.activation_checkpointing must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "none":
        return 0
    units = model.checkpoint_units(granularity)
    for unit in units:
        if getattr(unit, "_stunet_checkpointed", False):
            raise RuntimeError("activation checkpointing is already applied to this model")
        # A bound method (not a closure) so copy.deepcopy of the model re-binds it to the copy.
        unit.forward = types.MethodType(_checkpointed_forward, unit)
        unit._stunet_checkpointed = True
    return len(units)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)
