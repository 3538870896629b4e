"""``load_pretrained`` and ``initialize_from_pretrained``: STU-Net weights into a model, for fine-tuning.

    model = stunet_scale.load_pretrained("exports/stunet_b", in_channels=2, num_classes=14)
    print(model.load_report)          # which keys were loaded, adapted, skipped, and why

What a transfer does (STU-Net's ``run_finetuning*.py``, made explicit):

* **New label set.** When ``num_classes`` differs from the checkpoint (or ``reinit_heads=True``)
  every ``seg_outputs.*`` key is skipped and the heads keep their fresh He init. The report lists
  each skipped key.
* **More input channels** (CT + PET, 4 MR sequences): the two first convolutions, the stem's
  ``conv_blocks_context.0.0.conv1.weight`` and its 1x1x1 shortcut ``...conv3.weight``, are tiled
  along the input-channel axis. ``channel_init="repeat"`` copies the weights to every channel
  (STU-Net's choice; a multi-channel input then starts with N times the single-channel response),
  ``"repeat_scaled"`` also divides by N (nnU-Net's nnssl fine-tuning, ``pretrainedTrainer.py``: a
  constant image gives the pretrained response). Biases are kept.
* **Encoder only** (``encoder_only=True``): only ``conv_blocks_context.*`` is loaded; upsampling,
  decoder and heads keep their init - nnssl's "pretrained encoder" transfer.
* Everything else must match exactly (names and shapes); a mismatch is an error that names the
  first keys and the file, because a silently half-loaded backbone is the worst outcome.

Weights come from ``checkpoint_io.read_weights``, which never unpickles: safetensors, torch files
with ``weights_only=True`` and an allow-list, and a training run's ``portable/`` copy only.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models.stunet import ModelConfig, STUNet
from .axes import TRAINING_AXIS_ORDER, to_axis_order
from .checkpoint_io import STEM_KEYS, CheckpointError, Weights, read_weights
from .spec import AXIS_ORDERS, _plain

log = logging.getLogger("stunet_scale.export")

CHANNEL_INITS = ("repeat", "repeat_scaled")


@dataclass
class LoadReport:
    """What happened to every key. ``str(report)`` is the human version."""

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it kept its fresh init
    adapted: dict[str, str] = field(default_factory=dict)  # key -> how the tensor was changed before loading
    notes: list[str] = field(default_factory=list)  # axis conversion, architecture differences

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format})"]
        lines += [f"  note: {n}" for n in self.notes]
        for key, why in self.adapted.items():
            lines.append(f"  adapted {key}: {why}")
        for key, why in self.skipped.items():
            lines.append(f"  skipped {key}: {why}")
        return "\n".join(lines)


def _unwrap(model: nn.Module) -> nn.Module:
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def initialize_from_pretrained(
    model: nn.Module,
    path: str | Path | Weights,
    *,
    encoder_only: bool = False,
    channel_init: str = "repeat",
    reinit_heads: bool | None = None,
    axis_order: str = TRAINING_AXIS_ORDER,
) -> LoadReport:
    """Copy pretrained weights into ``model`` (an STU-Net, before any DDP/ZeRO/FSDP wrapping).

    ``axis_order``: the convention ``model`` runs in (``stunet_scale.export.axes``). The default is
    the trainer's (RAS arrays (x, y, z), our stores); exports and released files hold (z, y, x)
    weights and are converted here, by the one tested function, never by a transpose elsewhere.
    ``model``'s own ``in_channels`` / ``num_classes`` decide the adaptation: heads are re-initialised
    when the class count differs (or ``reinit_heads=True``), the stem is tiled when it has more input
    channels than the checkpoint. Returns a ``LoadReport``; raises ``CheckpointError`` naming the file
    on any other mismatch.
    """
    if channel_init not in CHANNEL_INITS:
        raise ValueError(f"channel_init must be one of {CHANNEL_INITS}, got {channel_init!r}")
    if axis_order not in AXIS_ORDERS:
        raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
    if isinstance(path, Weights):
        # the caller's object stays as it was: new tensors where the convention differs
        ckpt, spec = to_axis_order(path.state_dict, path.spec, axis_order)
        weights = path
    else:
        weights = read_weights(path)
        ckpt, spec = to_axis_order(weights.state_dict, weights.spec, axis_order, in_place=True)
    source = weights.path
    net = _unwrap(model)
    target = net.state_dict()
    report = LoadReport(source=str(source), format=weights.format)
    if weights.spec.axis_order != axis_order:
        report.notes.append(f"weights converted from {weights.spec.axis_order} to {axis_order} "
                            f"(conv kernels' spatial dims reversed)")
    cfg = getattr(net, "config", None)
    if cfg is not None and spec.model.get("pool_strides") not in (None, cfg.pool_strides):
        # Weight shapes do not depend on strides, so this loads; but the network computes a different
        # function from the one that was trained (e.g. [2,2,2] where the release halves one axis only).
        msg = (f"pool strides differ: checkpoint {spec.model['pool_strides']} ({axis_order}), model "
               f"{cfg.pool_strides}; set model.pool_strides to the checkpoint's to run the trained function")
        report.notes.append(msg)
    stride_note = bool(report.notes and report.notes[-1].startswith("pool strides differ"))

    head_keys = [k for k in target if k.startswith("seg_outputs.")]
    ckpt_classes = int(ckpt["seg_outputs.0.weight"].shape[0]) if "seg_outputs.0.weight" in ckpt else None
    model_classes = int(target["seg_outputs.0.weight"].shape[0]) if "seg_outputs.0.weight" in target else None
    if reinit_heads is None:
        reinit_heads = ckpt_classes != model_classes
    new: dict[str, torch.Tensor] = {}
    for key in target:
        if encoder_only and not key.startswith("conv_blocks_context."):
            report.skipped[key] = "encoder_only: decoder and heads keep their fresh init"
            continue
        if reinit_heads and key in head_keys:
            why = (f"head re-initialised ({ckpt_classes} -> {model_classes} classes)" if ckpt_classes != model_classes
                   else "head re-initialised (reinit_heads=True)")
            report.skipped[key] = why
            continue
        if key not in ckpt:
            continue  # collected as missing below
        tensor = ckpt[key]
        want = target[key].shape
        if key in STEM_KEYS and tensor.shape != want and tensor.shape[0] == want[0] and tensor.shape[2:] == want[2:]:
            tensor, how = _adapt_stem(key, tensor, target[key].shape, channel_init, source)
            report.adapted[key] = how
        new[key] = tensor

    wanted = [k for k in target if k not in report.skipped]
    missing = [k for k in wanted if k not in ckpt]
    unexpected = [] if encoder_only else [k for k in ckpt if k not in target and not (reinit_heads and k.startswith("seg_outputs."))]
    wrong = [f"{k}: checkpoint {tuple(new[k].shape)} vs model {tuple(target[k].shape)}"
             for k in new if new[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} model keys missing in the checkpoint (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint keys the model lacks (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
        hint = _architecture_hint(spec, net)
        raise CheckpointError(f"{source}: does not fit this model - {'; '.join(problems)}.{hint}")

    with torch.no_grad():
        for key, tensor in new.items():
            target[key].copy_(tensor.to(dtype=target[key].dtype, device=target[key].device))
    report.loaded = list(new)
    level = logging.WARNING if report.skipped or report.adapted or stride_note else logging.INFO
    log.log(level, "%s", report)
    return report


def _adapt_stem(key: str, tensor: torch.Tensor, shape: torch.Size, channel_init: str, source) -> tuple[torch.Tensor, str]:
    have, want = int(tensor.shape[1]), int(shape[1])
    if have != 1:
        raise CheckpointError(
            f"{source}: {key} has shape {tuple(tensor.shape)}, the model needs {tuple(shape)}; only a 1-channel "
            f"stem can be tiled to more input channels"
        )
    tiled = tensor.repeat(1, want, 1, 1, 1)
    if channel_init == "repeat_scaled":
        tiled = tiled / want
        return tiled, f"1 -> {want} input channels, repeated and divided by {want} (nnssl)"
    return tiled, f"1 -> {want} input channels, repeated (STU-Net)"


def _architecture_hint(spec, net: nn.Module) -> str:
    cfg = getattr(net, "config", None)
    ck = spec.model_config
    if cfg is None:
        return ""
    diffs = [f"{name}={getattr(ck, name)!r} (model: {getattr(cfg, name)!r})"
             for name in ("size", "base_width", "blocks_per_stage", "width_multipliers", "kernel_sizes")
             if getattr(ck, name) != getattr(cfg, name)]
    return f" The checkpoint has {', '.join(diffs)}; set model.* to match." if diffs else ""


def load_pretrained(
    path: str | Path,
    in_channels: int | None = None,
    num_classes: int | None = None,
    encoder_only: bool = False,
    *,
    channel_init: str = "repeat",
    reinit_heads: bool | None = None,
    deep_supervision: bool | None = None,
    seed: int | None = 0,
    axis_order: str | None = None,
    **model_overrides,
) -> STUNet:
    """Build an STU-Net from any checkpoint we can read and load its weights.

    ``path``: an export folder or file of ours, a released STU-Net ``*.model`` / ``.pth``, an nnU-Net
    v2 model folder of ours, or a ``stunet-scale train`` run / checkpoint. ``in_channels`` /
    ``num_classes`` default to the checkpoint's; different values adapt the stem / re-initialise
    the heads (see module docstring). ``model_overrides`` are ModelConfig fields (e.g.
    ``pool_strides`` for a different target spacing; weight shapes do not depend on them).
    ``seed`` makes the fresh parts (new heads, decoder with ``encoder_only``) reproducible.
    ``axis_order``: the convention of the returned model (``stunet_scale.export.axes``); None keeps
    the file's (``ras_zyx`` for exports and released files: feed it SimpleITK / nnU-Net arrays),
    ``"ras_xyz"`` gives the convention ``stunet-scale train`` runs in (our stores' RAS (x, y, z)).

    Returns the model in eval mode with ``model.load_report`` (what was loaded, adapted, skipped) and
    ``model.spec`` (spacing, normalisation, labels the weights expect).
    """
    weights = read_weights(path)
    if axis_order is not None and axis_order != weights.spec.axis_order:
        weights.state_dict, weights.spec = to_axis_order(weights.state_dict, weights.spec, axis_order,
                                                           in_place=True)
    spec = weights.spec
    overrides = dict(model_overrides)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise TypeError(f"load_pretrained got unknown ModelConfig fields {sorted(unknown)}")
    if in_channels is not None:
        overrides["in_channels"] = int(in_channels)
    if num_classes is not None:
        overrides["num_classes"] = int(num_classes)
    if deep_supervision is not None:
        overrides["deep_supervision"] = bool(deep_supervision)
    config = dataclasses.replace(spec.model_config, **overrides).resolved()
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = STUNet(config)
    else:
        model = STUNet(config)
    report = initialize_from_pretrained(model, weights, encoder_only=encoder_only, channel_init=channel_init,
                                        reinit_heads=reinit_heads, axis_order=spec.axis_order)
    model.load_report = report
    model.spec = dataclasses.replace(spec.with_heads(config.num_classes, config.in_channels),
                                     model=_plain(dataclasses.asdict(config)))
    if reinit_heads and config.num_classes == spec.num_classes:
        model.spec = dataclasses.replace(model.spec, labels=[], class_map=None, totalseg_version=None)
    return model.eval()
