"""nnU-Net's Dice + cross-entropy with deep supervision, computed in fp32.

    loss = sum_i w_i * (ce_weight * CE(logits_i, y_i) + dice_weight * (1 - mean soft Dice(logits_i, y_i)))

STU-Net pretrained with nnU-Net v1's ``DC_and_CE_loss({'batch_dice': False, 'smooth': 1e-5,
'do_bg': False}, {})``: soft Dice on the softmax, per sample (``batch_dice=False``), averaged over
foreground classes (background excluded), plus CE, weights 1:1; deep-supervision weights
[8, 4, 2, 1, 0]/15, full resolution first. nnU-Net returns ``-dice``; we return ``1 - dice``,
which differs by a constant only, so gradients are identical and the logged number is >= 0.

Why no one-hot: for 105 classes at 128^3 a one-hot target is 105 x 2M floats per sample. The
true-positive sum only needs the softmax probability of the true class per voxel, scattered into
its class bin (``gather`` + ``scatter_add``), and the target volume per class is a bincount.

Why fp32: under bf16 autocast the logits arrive in bf16. Softmax over 105 classes and sums over
2M voxels in bf16 lose the small classes entirely, so the logits are upcast before anything else
and autocast is switched off here (tests/test_train_loss.py checks both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def soft_dice_per_class(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5, batch_dice: bool = False
) -> torch.Tensor:
    """Soft Dice of every class: [B, C] (per sample) or [1, C] (batch_dice). fp32 in, fp32 out.

    ``logits`` [B, C, *spatial]; ``target`` [B, 1, *spatial] or [B, *spatial] integer labels.
    """
    b, c = logits.shape[:2]
    probs = torch.softmax(logits.float(), dim=1).reshape(b, c, -1)
    labels = target.reshape(b, -1).long()
    if labels.shape[1] != probs.shape[2]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    p_true = probs.gather(1, labels.unsqueeze(1)).squeeze(1)  # [B, N] probability of the true class
    tp = torch.zeros(b, c, dtype=probs.dtype, device=probs.device).scatter_add_(1, labels, p_true)
    volume = torch.zeros(b, c, dtype=probs.dtype, device=probs.device).scatter_add_(
        1, labels, torch.ones_like(p_true)
    )
    pred_sum = probs.sum(2)
    if batch_dice:
        tp, volume, pred_sum = tp.sum(0, keepdim=True), volume.sum(0, keepdim=True), pred_sum.sum(0, keepdim=True)
    # 2TP + FP + FN == sum(pred) + sum(target)
    return (2 * tp + smooth) / (pred_sum + volume + smooth).clamp_min(1e-8)


class DiceCELoss:
    """Deep-supervised Dice + CE. Call with the model's outputs and the stream's targets.

    Returns ``(total, terms)`` where ``terms`` holds detached fp32 ``dice`` (mean soft Dice of the
    full-resolution output, foreground classes) and ``ce`` (full resolution) for logging.
    """

    def __init__(
        self,
        ds_weights: Sequence[float] = (8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0),
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth: float = 1e-5,
        batch_dice: bool = False,
    ):
        self.ds_weights = [float(w) for w in ds_weights]
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.smooth, self.batch_dice = float(smooth), bool(batch_dice)

    @classmethod
    def from_config(cls, loss_cfg) -> "DiceCELoss":
        return cls(loss_cfg.deep_supervision_weights, loss_cfg.dice_weight, loss_cfg.ce_weight,
                   loss_cfg.dice_smooth, loss_cfg.batch_dice)

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = logits.float()
        labels = target.reshape(target.shape[0], *target.shape[-3:]).long()
        ce = F.cross_entropy(logits, labels)
        dice = soft_dice_per_class(logits, labels, self.smooth, self.batch_dice)[:, 1:].mean()
        return self.ce_weight * ce + self.dice_weight * (1.0 - dice), dice, ce

    def __call__(self, outputs, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(outputs, torch.Tensor):
            outputs, weights = (outputs,), [1.0]
        else:
            weights = self.ds_weights
        if not isinstance(targets, (list, tuple)):
            targets = [targets]
        if len(targets) < len(outputs):
            raise ValueError(f"{len(outputs)} network outputs but {len(targets)} targets")
        if len(weights) != len(outputs):
            raise ValueError(f"{len(outputs)} network outputs but {len(weights)} loss.deep_supervision_weights")
        # Devices without autocast (meta, where `stunet-scale plan` runs this loss to measure what it
        # saves for backward) reject even torch.autocast(enabled=False); nothing can be autocast
        # there, so there is nothing to switch off.
        dev = outputs[0].device.type
        guard = torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()
        with guard:
            total, terms = None, {}
            for i, (out, tgt, w) in enumerate(zip(outputs, targets, weights)):
                # Zero-weighted outputs still enter the graph (times 0), so every parameter gets a
                # gradient: DDP and ZeRO-3 expect that, and the cost at the coarsest scale is nil.
                value, dice, ce = self.single(out, tgt)
                total = value * w if total is None else total + value * w
                if i == 0:
                    terms = {"dice": dice.detach(), "ce": ce.detach()}
        return total, terms
