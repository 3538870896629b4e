"""Activation checkpointing from outside the model: same gradients, same keys, every param trains."""

from __future__ import annotations

import copy

import pytest
import torch

from stunet_scale.models import ModelConfig, build_stunet
from stunet_scale.parallel import apply_activation_checkpointing


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = sum((w * o.float().square().mean()) for w, o in zip([1, 0.5, 0.25, 0.125, 0.0625], out))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("granularity", ["block", "stage"])
def test_gradients_equal_with_and_without_checkpointing(granularity):
    torch.manual_seed(0)
    reference = build_stunet(ModelConfig(size=None, base_width=2, blocks_per_stage=2, num_classes=4))
    wrapped = copy.deepcopy(reference)
    n = apply_activation_checkpointing(wrapped, granularity)
    assert n == (22 if granularity == "block" else 11)
    x = torch.randn(2, 1, 64, 64, 64)
    loss_ref, g_ref = _grads(reference, x)
    loss_ckpt, g_ckpt = _grads(wrapped, x)
    torch.testing.assert_close(loss_ckpt, loss_ref)
    assert set(g_ckpt) == set(g_ref)
    for name in g_ref:
        # Every parameter gets a gradient, including the first block that sees the raw image
        # (the case reentrant checkpointing gets wrong).
        assert g_ckpt[name] is not None, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(g_ckpt[name], g_ref[name], rtol=1e-5, atol=1e-7)
    assert list(wrapped.state_dict()) == list(reference.state_dict())


def test_checkpointing_is_non_reentrant_and_not_applied_twice():
    model = build_stunet(ModelConfig(size=None, base_width=2, blocks_per_stage=1, num_classes=2))
    apply_activation_checkpointing(model, "block")
    with pytest.raises(RuntimeError, match="already applied"):
        apply_activation_checkpointing(model, "block")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        apply_activation_checkpointing(build_stunet("S"), "layer")
    assert apply_activation_checkpointing(build_stunet(ModelConfig(size=None, base_width=2, blocks_per_stage=1)), "none") == 0


def test_deepcopy_rebinds_checkpointed_forward():
    model = build_stunet(ModelConfig(size=None, base_width=2, blocks_per_stage=1, num_classes=2))
    apply_activation_checkpointing(model, "stage")
    clone = copy.deepcopy(model)
    stage = clone.conv_blocks_context[0]
    assert stage.forward.__self__ is stage
