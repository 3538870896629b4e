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


_CHUNK_BYTES = 1 << 20  # temporaries this small come from (and go back to) the same malloc bins


def _reverse_spatial_in_place(tensor: torch.Tensor) -> torch.Tensor:
    """``reverse_spatial`` written into ``tensor``'s own storage, a few output channels at a time.

    Returns the view of that storage with the reversed shape (the same shape for cubic kernels).
    Whole-tensor temporaries (up to 1536 x 1536 x 27 floats for STU-Net-H) would leave the heap
    fragmented; ~1 MB chunks of output channels are reused bin for bin.
    """
    o = tensor.shape[0]
    per_channel = tensor[0].numel() * tensor.element_size()
    step = max(1, _CHUNK_BYTES // max(1, per_channel))
    flat = tensor.view(o, -1)
    for start in range(0, o, step):
        block = tensor[start:start + step]
        flat[start:start + step].copy_(block.permute(0, 1, 4, 3, 2).reshape(block.shape[0], -1))
    k0, k1, k2 = tensor.shape[2:]
    return tensor.view(o, tensor.shape[1], k2, k1, k0)


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


def to_axis_order(state_dict: MutableMapping[str, torch.Tensor], spec: ModelSpec, to: str, *,
                  in_place: bool = False) -> tuple[OrderedDict[str, torch.Tensor], ModelSpec]:
    """``(state_dict, spec)`` in convention ``to``. The identity (same tensors) when already there.

    ``in_place``: the caller owns the tensors (just read them from a file): each conv weight is
    rewritten inside its own storage through one temporary the size of that tensor, so converting a
    1.46B-parameter model costs no second copy of it (allocating a new tensor per key and dropping
    the old one does not give the memory back: glibc keeps freed heap chunks). Otherwise new
    tensors are made and the caller's are left as they were.
    """
    new_spec = convert_spec(spec, to)
    if new_spec is spec:
        return (state_dict if isinstance(state_dict, OrderedDict) else OrderedDict(state_dict)), spec
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, tensor in state_dict.items():
        if in_place and tensor.dim() == 5 and tensor.is_contiguous():
            out[key] = _reverse_spatial_in_place(tensor)
        else:
            out[key] = reverse_spatial(tensor)
    return out, new_spec
