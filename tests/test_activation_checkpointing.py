"""Activation checkpointing from outside the model: same gradients, same keys, every param trains."""

from __future__ import annotations

import copy

import pytest
import torch

from stunet_scale.models import ModelConfig, build_stunet
from stunet_scale.parallel import apply_activation_checkpointing

# Convs whose calls are counted: the first block that sees the raw image, a later block inside a
# multi-block stage (so "stage" granularity is checked beyond its first block), and an upsampling
# conv that is never wrapped (a control: it must run once either way).
WATCHED = ("conv_blocks_context.0.0.conv1", "conv_blocks_context.1.1.conv1", "upsample_layers.0.conv")


def _grads(model, x):
    """Loss, per-parameter grads and how often each watched conv ran in one forward+backward."""
    model.zero_grad(set_to_none=True)
    calls = dict.fromkeys(WATCHED, 0)
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
               for name in WATCHED]
    try:
        out = model(x)
        loss = sum((w * o.float().square().mean()) for w, o in zip([1, 0.5, 0.25, 0.125, 0.0625], out))
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, calls


@pytest.mark.parametrize("granularity", ["block", "stage"])
def test_gradients_equal_with_and_without_checkpointing(granularity):
    torch.manual_seed(0)
    reference = build_stunet(ModelConfig(size=None, base_width=2, blocks_per_stage=2, num_classes=4))
    wrapped = copy.deepcopy(reference)
    n = apply_activation_checkpointing(wrapped, granularity)
    assert n == (22 if granularity == "block" else 11)
    x = torch.randn(2, 1, 64, 64, 64)
    loss_ref, g_ref, calls_ref = _grads(reference, x)
    loss_ckpt, g_ckpt, calls_ckpt = _grads(wrapped, x)
    # Equal gradients alone would also pass if checkpointing did nothing: show that backward
    # really recomputes the wrapped units (each watched block conv runs again) and only those.
    assert calls_ref == dict.fromkeys(WATCHED, 1)
    assert calls_ckpt == {"conv_blocks_context.0.0.conv1": 2, "conv_blocks_context.1.1.conv1": 2,
                          "upsample_layers.0.conv": 1}
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
