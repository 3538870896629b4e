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

Labels that say nothing (tests/test_class_map_fidelity.py):

* **Ignore label** (nnU-Net v2 semantics): a target value equal to the number of output channels C
  (one above the last class) marks voxels of a source class the class map lacks, e.g. TotalSegmentator
  v2's ``heart`` for STU-Net's v1 head. They are left out of CE (mean over the other voxels, 0 when
  none is left, as nnU-Net) and out of every Dice sum (probabilities and target), so any prediction
  there costs nothing.
* **Unannotated classes** (``annotated[b, k]`` False: class k's mask file was missing in sample b's
  case): a *marginal* loss. CE takes for a background voxel log(p_background + sum of p over the
  unannotated classes): "background" in such a case only says "none of the annotated classes", so
  the likelihood of that statement is the merged probability. Dice leaves those classes out of its
  mean. The network is then free to call those voxels any unannotated class or background, and is
  still taught everything the annotated classes say. Why not a masked loss (drop the unannotated
  channels from the softmax): renormalising over the annotated channels makes the loss depend on how
  probability is split between background and an unannotated class, i.e. it would still push the
  unannotated class down wherever it competes with background, which is exactly "this organ is
  background".
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def soft_dice_per_class(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5, batch_dice: bool = False,
    weights: torch.Tensor | None = None, has_ignored: bool | None = None,
) -> torch.Tensor:
    """Soft Dice of every class: [B, C] (per sample) or [1, C] (batch_dice). fp32 in, fp32 out.

    ``logits`` [B, C, *spatial]; ``target`` [B, 1, *spatial] or [B, *spatial] integer labels, where
    the value C is the ignore label: those voxels enter no sum. ``weights`` [B, C] (0/1, on the
    logits' device): with ``batch_dice`` a sample enters class k's sums only where its weight is 1
    (the class is annotated in its case). ``has_ignored``: whether ``target`` holds the ignore label
    (None: look, which reads one flag back from the device).
    """
    b, c = logits.shape[:2]
    probs = torch.softmax(logits.float(), dim=1).reshape(b, c, -1)
    labels = target.reshape(b, -1).long()
    if labels.shape[1] != probs.shape[2]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if has_ignored is None:
        has_ignored = bool((labels == c).any())
    if has_ignored:
        # the ignore label (nnU-Net v2: one above the last class) enters no sum. Only for batches
        # that hold it: the masked sum of the probabilities costs one more full-size [B, C, N]
        # buffer in backward, and `stunet-scale plan` (tests/test_plan.py) models the plain path.
        valid = labels != c
        labels = labels.masked_fill(~valid, 0)
        valid_f = valid.to(probs.dtype)
        p_true = probs.gather(1, labels.unsqueeze(1)).squeeze(1) * valid_f  # [B, N] probability of the true class
        volume = torch.zeros(b, c, dtype=probs.dtype, device=probs.device).scatter_add_(1, labels, valid_f)
        pred_sum = (probs * valid_f.unsqueeze(1)).sum(2)
    else:
        p_true = probs.gather(1, labels.unsqueeze(1)).squeeze(1)  # [B, N] probability of the true class
        volume = torch.zeros(b, c, dtype=probs.dtype, device=probs.device).scatter_add_(
            1, labels, torch.ones_like(p_true)
        )
        pred_sum = probs.sum(2)
    tp = torch.zeros(b, c, dtype=probs.dtype, device=probs.device).scatter_add_(1, labels, p_true)
    if batch_dice:
        if weights is not None:
            tp, volume, pred_sum = tp * weights, volume * weights, pred_sum * weights
        tp, volume, pred_sum = tp.sum(0, keepdim=True), volume.sum(0, keepdim=True), pred_sum.sum(0, keepdim=True)
    # 2TP + FP + FN == sum(pred) + sum(target)
    return (2 * tp + smooth) / (pred_sum + volume + smooth).clamp_min(1e-8)


def _host_annotated(annotated, b: int, c: int) -> torch.Tensor | None:
    """``annotated`` as a host bool tensor [B, C], or None when every class is annotated."""
    if annotated is None:
        return None
    if isinstance(annotated, torch.Tensor):
        a = annotated.detach().to("cpu", torch.bool)  # the loader keeps it on the host: no sync then
    else:
        a = torch.as_tensor(annotated, dtype=torch.bool)
    if tuple(a.shape) != (b, c):
        raise ValueError(f"annotated has shape {tuple(a.shape)}, expected [batch, classes] = [{b}, {c}]")
    return None if bool(a[:, 1:].all()) else a


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor | None = None,
                  has_ignored: bool = True) -> torch.Tensor:
    """CE: per sample the mean over its voxels whose label is not the ignore label (C), then the
    mean over samples (a sample with no such voxel contributes 0). ``has_ignored`` False: the caller
    knows there is no ignored voxel (plain mean CE, identical).

    Per sample first, so that the loss of a global batch does not depend on how it is split into
    micro-batches and ranks (2 ranks x 1 sample must equal 1 rank x 2 samples for exact resume on
    another world size); one pooled mean would weight samples by their count of non-ignored voxels.

    ``annotated`` (host bool [B, C], from ``_host_annotated``): for sample b, a background voxel
    scores log(p_0 + sum of p_k over the classes k unannotated in b), the marginal likelihood.
    """
    b, c = logits.shape[:2]
    if annotated is None and not has_ignored:
        return F.cross_entropy(logits, labels)
    valid = labels != c
    count = valid.reshape(b, -1).sum(1).clamp_min(1).to(logits.dtype)  # [B]
    if annotated is None:
        nll = F.cross_entropy(logits, labels, ignore_index=c, reduction="none")  # 0 where ignored
        return (nll.reshape(b, -1).sum(1) / count).mean()
    merge = [0] + [k for k in range(1, c) if not bool(annotated[:, k].all())]  # unannotated somewhere
    lp = F.log_softmax(logits, dim=1)
    safe = labels.masked_fill(~valid, 0)
    nll = -lp.gather(1, safe.unsqueeze(1)).squeeze(1)
    # background merged with the sample's unannotated classes; only those channels are gathered
    allowed = torch.tensor([[k == 0 or not bool(annotated[i, k]) for k in merge] for i in range(b)],
                           device=logits.device).view(b, len(merge), *([1] * (logits.dim() - 2)))
    merged = torch.logsumexp(lp[:, merge].masked_fill(~allowed, float("-inf")), dim=1)
    nll = torch.where(safe == 0, -merged, nll)
    return ((nll * valid.to(nll.dtype)).reshape(b, -1).sum(1) / count).mean()


class DiceCELoss:
    """Deep-supervised Dice + CE. Call with the model's outputs and the stream's targets, and the
    batch's ``annotated`` [B, C] bool (host) when some classes were unannotated in a sample's case.

    Returns ``(total, terms)`` where ``terms`` holds detached fp32 ``dice`` (mean soft Dice of the
    full-resolution output, annotated foreground classes) and ``ce`` (full resolution) for logging.
    Target value C (the number of output channels) is the ignore label; see the module docstring.
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
    def from_config(cls, loss_cfg) -> DiceCELoss:
        return cls(loss_cfg.deep_supervision_weights, loss_cfg.dice_weight, loss_cfg.ce_weight,
                   loss_cfg.dice_smooth, loss_cfg.batch_dice)

    def single(self, logits: torch.Tensor, target: torch.Tensor, annotated=None,
               has_ignored: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = logits.float()
        b, c = logits.shape[:2]
        labels = target.reshape(target.shape[0], *target.shape[-3:]).long()
        ann = _host_annotated(annotated, b, c)
        ce = cross_entropy(logits, labels, ann, has_ignored)
        if ann is None:
            dice = soft_dice_per_class(logits, labels, self.smooth, self.batch_dice,
                                       has_ignored=has_ignored)[:, 1:].mean()
        else:
            # the mean over (sample, class) pairs whose class is annotated in that sample's case
            w = ann.to(logits.device, torch.float32)
            per = soft_dice_per_class(logits, labels, self.smooth, self.batch_dice, weights=w,
                                      has_ignored=has_ignored)[:, 1:]
            w = (w.amax(0, keepdim=True) if self.batch_dice else w)[:, 1:]
            # per sample the mean over its annotated classes, then over samples: independent of
            # how the global batch is split into micro-batches and ranks (see cross_entropy)
            dice = ((per * w).sum(1) / w.sum(1).clamp_min(1.0)).mean()
        return self.ce_weight * ce + self.dice_weight * (1.0 - dice), dice, ce

    def __call__(self, outputs, targets, annotated=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        # Does the batch hold the ignore label (value C)? One flag read back from the device per
        # micro-batch: the trainer reads its non-finite flag right after the loss anyway, so this
        # stalls nothing of substance, and batches without it keep the plain (cheaper) loss. The
        # full-resolution target holds every label value of the coarser ones (they are subsamples).
        c = outputs[0].shape[1]
        has_ignored = dev != "meta" and bool((targets[0] == c).any())
        with guard:
            total, terms = None, {}
            for i, (out, tgt, w) in enumerate(zip(outputs, targets, weights)):
                # Zero-weighted outputs still enter the graph (times 0), so every parameter gets a
                # gradient: DDP and ZeRO-3 expect that, and the cost at the coarsest scale is nil.
                value, dice, ce = self.single(out, tgt, annotated, has_ignored)
                total = value * w if total is None else total + value * w
                if i == 0:
                    terms = {"dice": dice.detach(), "ce": ce.detach()}
        return total, terms
