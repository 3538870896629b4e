"""The training loss equals nnU-Net's DC_and_CE_loss (up to its constant), stays fp32, reaches every output."""

from __future__ import annotations

import pytest
import torch

from stunet_scale.train.loss import DiceCELoss, soft_dice_per_class

WEIGHTS = [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0]


def _batch(num_classes=5, b=2, size=16, scales=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs, tgts = [], []
    for i in range(scales):
        s = size // 2**i
        outs.append(torch.randn(b, num_classes, s, s, s, generator=g))
        tgts.append(torch.randint(0, num_classes, (b, 1, s, s, s), generator=g))
    return outs, tgts


def test_matches_nnunet_dc_and_ce_with_deep_supervision():
    nnunet = pytest.importorskip("nnunetv2")
    del nnunet
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    outs, tgts = _batch()
    ref = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                       weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss),
        WEIGHTS,
    )
    ours, terms = DiceCELoss(WEIGHTS)(tuple(outs), tgts)
    # nnU-Net returns -Dice, we return 1 - Dice: same gradient, offset by the sum of the weights.
    assert ours.item() == pytest.approx(ref(outs, tgts).item() + sum(WEIGHTS), rel=1e-5, abs=1e-6)
    assert 0 <= terms["dice"].item() <= 1


def test_dice_is_per_sample_and_ignores_background():
    logits = torch.full((2, 3, 4, 4, 4), -20.0)
    target = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    target[0, :, :2] = 1  # sample 0: class 1 in half the volume
    target[1, :, :2] = 2  # sample 1: class 2
    # predict the truth exactly
    logits.scatter_(1, target, 20.0)
    dice = soft_dice_per_class(logits, target)
    assert dice.shape == (2, 3)
    assert dice[0, 1].item() == pytest.approx(1.0, abs=1e-4) and dice[1, 2].item() == pytest.approx(1.0, abs=1e-4)
    # class 2 absent from sample 0 and not predicted: smooth / smooth = 1, as nnU-Net's formula gives
    assert dice[0, 2].item() == pytest.approx(1.0, abs=1e-3)
    batch = soft_dice_per_class(logits, target, batch_dice=True)
    assert batch.shape == (1, 3)
    loss, terms = DiceCELoss([1.0])(logits, target)
    assert terms["dice"].item() == pytest.approx(1.0, abs=1e-3)  # background (channel 0) not in the mean


def test_loss_is_fp32_from_bf16_logits_under_autocast():
    outs, tgts = _batch(seed=1)
    ref, _ = DiceCELoss(WEIGHTS)(tuple(o.to(torch.bfloat16).float() for o in outs), tgts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = DiceCELoss(WEIGHTS)(tuple(o.to(torch.bfloat16) for o in outs), tgts)
    assert loss.dtype == torch.float32 and terms["ce"].dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_zero_weighted_output_still_gets_a_gradient():
    outs, tgts = _batch(seed=2)
    outs = [o.requires_grad_() for o in outs]
    loss, _ = DiceCELoss(WEIGHTS)(tuple(outs), tgts)
    loss.backward()
    assert all(o.grad is not None for o in outs)  # DDP and ZeRO-3 need every parameter in the graph
    assert torch.count_nonzero(outs[-1].grad) == 0 and torch.count_nonzero(outs[0].grad) > 0


def test_mismatched_outputs_and_weights_fail_clearly():
    outs, tgts = _batch(scales=4)
    with pytest.raises(ValueError, match="deep_supervision_weights"):
        DiceCELoss(WEIGHTS)(tuple(outs), tgts)
