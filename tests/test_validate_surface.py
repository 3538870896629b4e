"""Training validation's HD95 / NSD (stunet_scale/train/validate.py): the same numbers as
``surface_metrics`` on each case, means over cases then classes, ignore label and unannotated
classes skipped, one-sided misses counted as inf. A one-rank stand-in backend, no training."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from synthetic_data import CasesDataSource

from stunet_scale.surface_metrics import class_metrics
from stunet_scale.train.validate import Validator

N = 4  # classes 0..3, ignore label 4
SPACING = [0.8, 0.8, 3.0]


def _cases():
    a = np.zeros((16, 16, 8), np.int64)
    a[2:8, 2:9, 1:5] = 1
    a[9:14, 4:12, 3:7] = 2
    a[0:2, 0:2, 0:2] = N  # ignored voxels
    pa = a.copy()
    pa[pa == 1] = 0
    pa[3:9, 2:9, 2:6] = 1  # class 1 shifted by one voxel in x and one 3 mm slice
    pa[0:2, 0:2, 0:2] = 2  # predictions on ignored voxels: no false positives
    pa[15, 15, 7] = 3  # class 3: unannotated in case a -> not scored
    b = np.zeros((16, 16, 8), np.int64)
    b[4:12, 4:12, 2:6] = 1
    pb = b.copy()
    pb[0, 0, 0] = 2  # class 2 absent from b's reference: a one-sided miss (hd95 inf, nsd 0)
    return {"a": (pa, a, {"missing_classes": [3]}), "b": (pb, b, {})}


def _validator(surface=True, tol=2.0):
    cases = _cases()

    def forward(x):  # the "image" is the prediction itself: logits that argmax to it
        return torch.nn.functional.one_hot(x[:, 0].round().long(), N).permute(0, 4, 1, 2, 3).float() * 10

    cfg = SimpleNamespace(
        seed=0, model=SimpleNamespace(num_classes=N, in_channels=1),
        data=SimpleNamespace(patch_size=[16, 16, 8], spacing=SPACING),
        augmentation=SimpleNamespace(mirror_axes=[0, 1, 2]),
        validation=SimpleNamespace(mirroring=False, max_cases=0, step_size=0.5, enabled=True, pseudo_dice_batches=0,
                                   surface_metrics=surface, nsd_tolerance_mm=tol))
    env = SimpleNamespace(is_main=True, rank=0, world_size=1, broadcast_object=lambda o: o, all_reduce=lambda v, op: v)
    backend = SimpleNamespace(eval_forward=forward, eval=lambda: None, after_eval=lambda: None, train=lambda: None,
                              device=torch.device("cpu"))
    data = CasesDataSource({cid: (c[0][None].astype(np.float32), c[1], c[2]) for cid, c in cases.items()})
    return Validator(cfg, backend, env, data, Path("."), ["background", "a", "b", "c"])


def test_full_validation_reports_hd95_and_nsd_like_the_metric_module():
    r = _validator().full(0)
    (pa, a, _), (pb, b, _) = _cases()["a"], _cases()["b"]
    clean_a = np.where(a == N, 0, pa)
    ref1 = [class_metrics(clean_a == 1, a == 1, SPACING, 2.0), class_metrics(pb == 1, b == 1, SPACING, 2.0)]
    ref2 = class_metrics(clean_a == 2, a == 2, SPACING, 2.0)
    assert r["per_class_hd95"]["a"] == pytest.approx((ref1[0]["hd95"] + ref1[1]["hd95"]) / 2)
    # one 3 mm slice and one 0.8 mm voxel off: the 95th percentile lies between the two shifts' distances
    assert 3.0 <= ref1[0]["hd95"] <= math.hypot(0.8, 3.0) and ref1[1]["hd95"] == 0.0
    assert r["per_class_nsd"]["a"] == pytest.approx((ref1[0]["nsd"] + ref1[1]["nsd"]) / 2)
    # class b: perfect in case a, a one-sided miss in case b (inf: out of the HD95 mean, NSD 0 in)
    assert r["per_class_hd95"]["b"] == ref2["hd95"] == 0.0 and r["hd95_infinite"] == {"b": 1}
    assert r["per_class_nsd"]["b"] == pytest.approx(0.5)
    assert math.isnan(r["per_class_hd95"]["c"]) and math.isnan(r["per_class_nsd"]["c"])  # unannotated / absent
    assert r["mean_nsd"] == pytest.approx((r["per_class_nsd"]["a"] + 0.5) / 2)
    assert r["mean_hd95"] == pytest.approx((r["per_class_hd95"]["a"] + 0.0) / 2)
    assert _validator(tol=10.0).full(0)["per_class_nsd"]["a"] == 1.0  # a wider tolerance forgives the shift


def test_surface_metrics_off_keeps_dice_only():
    r = _validator(surface=False).full(0)
    assert "mean_hd95" not in r and r["mean_dice"] == pytest.approx(_validator().full(0)["mean_dice"])


def test_result_carries_every_key_the_trainer_records():
    from stunet_scale.train.validate import SURFACE_KEYS

    r = _validator(tol=1.5).full(0)
    assert set(SURFACE_KEYS) <= set(r) and r["nsd_tolerance_mm"] == 1.5
