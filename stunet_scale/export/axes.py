"""The one place where STU-Net weights change axis convention: ``to_axis_order``.

Two conventions exist (``ModelSpec.axis_order``):

* ``ras_xyz``: what ``stunet-scale train`` runs in. Prepared stores hold RAS-reoriented volumes with
  numpy axes (x, y, z) = (R, A, S).
* ``ras_zyx``: what the STU-Net release was trained in, and what every transfer file we write holds
  (``TRANSFER_AXIS_ORDER``). nnU-Net reads images with SimpleITK (numpy axes (z, y, x) of the file's
  voxel grid); TotalSegmentator's files are RAS, so the released networks saw (S, A, R) arrays. The
  official STU-Net fork builds its network from the release plans (last down-sampling ``[1, 1, 2]``)
  and feeds such arrays, so only weights in this convention compute, there, what we trained.

Why a transpose is exact: every layer of STU-Net is either a convolution (its kernel's three spatial
dims can be reversed along with the input's), instance norm and LeakyReLU (axis-agnostic) or a
nearest up-sampling (its scale factors are the pool strides). Reversing the spatial dims of every
conv kernel, and the per-axis lists of the architecture (pool strides, kernel sizes) and of the
preprocessing (spacing, patch size, mirror axes), gives a network whose output on ``x.permute(zyx)``
is the original output permuted the same way. Shapes of 3x3x3 and 1x1x1 kernels do not change, so
the state-dict keys and shapes stay those of the release whatever the convention.

Reversing twice is the identity bit for bit (it only moves numbers), which is what makes a released
file -> ``load_pretrained`` -> export round trip bit-identical. Everything that converts (export,
``load_pretrained``, ``initialize_from_pretrained`` / ``checkpoint.init_from``) calls this function.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import MutableMapping

import torch

from .spec import AXIS_ORDERS, ModelSpec

TRAINING_AXIS_ORDER = "ras_xyz"  # prepared stores, the trainer, validation
TRANSFER_AXIS_ORDER = "ras_zyx"  # every exported file, the release, nnU-Net / the official fork


def reverse_spatial(tensor: torch.Tensor) -> torch.Tensor:
    """A conv weight ``[out, in, k0, k1, k2]`` with its spatial dims reversed; other tensors unchanged."""
    if tensor.dim() != 5:
        return tensor
    return tensor.permute(0, 1, 4, 3, 2).contiguous()


def _reverse_triples(triples: list) -> list:
    return [list(t)[::-1] for t in triples]


def convert_spec(spec: ModelSpec, to: str) -> ModelSpec:
    """The spec of the same weights in axis convention ``to``: every per-axis list reversed.

    ``train_config`` is left as the run had it (it is a record of the training run, which always
    runs in ``ras_xyz``); everything a consumer uses to run the network is converted.
    """
    if to not in AXIS_ORDERS:
        raise ValueError(f"axis order must be one of {AXIS_ORDERS}, got {to!r}")
    if spec.axis_order == to:
        return spec
    model = dict(spec.model)
    for key in ("pool_strides", "kernel_sizes"):
        if key in model:
            model[key] = _reverse_triples(model[key])
    return dataclasses.replace(
        spec,
        model=model,
        spacing=list(spec.spacing)[::-1],
        patch_size=list(spec.patch_size)[::-1],
        mirror_axes=sorted(2 - int(a) for a in spec.mirror_axes),
        axis_order=to,
    )


def to_axis_order(state_dict: MutableMapping[str, torch.Tensor], spec: ModelSpec, to: str,
                  ) -> tuple["OrderedDict[str, torch.Tensor]", ModelSpec]:
    """``(state_dict, spec)`` in convention ``to``. The identity (same objects) when already there.

    The input mapping is emptied as it is converted, so converting a 1.46B-parameter model holds one
    extra tensor at a time, not a second copy of the model; pass a copy to keep the original.
    """
    new_spec = convert_spec(spec, to)
    if new_spec is spec:
        return (state_dict if isinstance(state_dict, OrderedDict) else OrderedDict(state_dict)), spec
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key in list(state_dict):
        out[key] = reverse_spatial(state_dict.pop(key))
    return out, new_spec
