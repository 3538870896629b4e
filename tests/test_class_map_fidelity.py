"""Class maps that do not lie: TotalSegmentator v2 data for STU-Net's v1 head, and missing mask files.

A source class with no target class (v2 ``heart`` for the v1 chambers) gets the ignore label; a
class whose mask file is missing is unannotated for that case. The loss skips the first and is
marginal for the second; validation Dice skips both. Every invariance below has a control that
changes the loss, so the tests can fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from synthetic_data import CasesDataSource

from stunet_scale.data.class_maps import TOTALSEG_V1_ONLY, TOTALSEG_V2_ONLY, load_class_map, source_correspondence
from stunet_scale.data.ingest.prepare import prepare_dataset
from stunet_scale.data.store import iter_wds_cases, open_store
from stunet_scale.data.stream import plan as sample_plan
from stunet_scale.data.stream import raw_batch, transforms
from stunet_scale.train.loss import DiceCELoss, soft_dice_per_class
from stunet_scale.train.validate import Validator, confusion_counts, dice_from_counts

STUNET = load_class_map("stunet")
IGNORE = STUNET.ignore_label  # 105
CHAMBERS = ["heart_atrium_left", "heart_atrium_right", "heart_myocardium", "heart_ventricle_left", "heart_ventricle_right"]
SHAPE = (24, 24, 24)  # 1.5 mm voxels: the store's grid is the file's grid minus the crop, no resampling
# (name, box) of the structures in the phantom; spinal_cord overlaps vertebrae_L1 on x 8..9
BOXES = {
    "heart": (slice(4, 10), slice(4, 10), slice(4, 10)),
    "liver": (slice(12, 19), slice(4, 10), slice(4, 10)),
    "vertebrae_L1": (slice(4, 10), slice(12, 18), slice(12, 18)),
    "spinal_cord": (slice(8, 12), slice(12, 18), slice(12, 18)),
    "aorta": (slice(14, 18), slice(14, 18), slice(4, 20)),
}


# ------------------------------------------------------------------------------------------------
# the correspondence
# ------------------------------------------------------------------------------------------------


def test_correspondence_tables_are_the_diff_of_the_shipped_maps():
    v1, v2 = set(load_class_map("totalseg-v1").foreground), set(load_class_map("totalseg-v2").foreground)
    assert set(TOTALSEG_V1_ONLY) == v1 - v2 and set(TOTALSEG_V2_ONLY) == v2 - v1
    assert len(v1 & v2) == 97 and set(STUNET.foreground) == v1
    c = source_correspondence(load_class_map("totalseg-v2").foreground, "stunet")
    assert c.mapped == {n: n for n in v1 & v2}  # nothing renamed: same name, same structure
    assert set(c.to_ignore) == set(TOTALSEG_V2_ONLY) and "heart" in c.to_ignore
    assert set(c.unannotated) == set(TOTALSEG_V1_ONLY) >= set(CHAMBERS)
    back = source_correspondence(load_class_map("totalseg-v1").foreground, "totalseg-v2")
    assert set(back.to_ignore) == set(TOTALSEG_V1_ONLY) and set(back.unannotated) == set(TOTALSEG_V2_ONLY)
    assert "an_extra_mask" in source_correspondence(["liver", "an_extra_mask"], "stunet").to_ignore


def test_subset_map_makes_other_totalsegmentator_classes_background_unless_they_may_overlap():
    major = load_class_map("totalseg-major")
    v1, v2 = set(load_class_map("totalseg-v1").foreground), set(load_class_map("totalseg-v2").foreground)
    assert major.others_background and set(major.foreground) <= v1 & v2 and major.num_outputs == 25
    c = source_correspondence(load_class_map("totalseg-v2").foreground, "totalseg-major")
    assert c.mapped == {n: n for n in major.foreground} and not c.unannotated
    # heart and S1 cover no subset class: background; v1 may have counted kidney cysts in the kidney: ignored
    assert {"heart", "vertebrae_S1", "vertebrae_L1", "colon"} <= set(c.to_background)
    assert set(c.to_ignore) == {"kidney_cyst_left", "kidney_cyst_right"}
    assert "an_extra_mask" in source_correspondence(["liver", "an_extra_mask"], "totalseg-major").to_ignore


def test_prepare_with_the_subset_map_stores_other_classes_as_background(tmp_path):
    raw = tmp_path / "raw"
    _write_case(raw, "s0001")
    (raw / "meta.csv").write_text("image_id;split\ns0001;train\n")
    r = prepare_dataset(raw, tmp_path / "out", classes="totalseg-major", format="zarr", spacing=1.5)
    assert r["exit_code"] == 0
    major = load_class_map("totalseg-major")
    store = open_store(tmp_path / "out")
    (x0, x1), (y0, y1), (z0, z1) = store.meta("s0001")["geometry"]["crop_box"]
    want = np.zeros(SHAPE, np.uint8)  # heart, L1 and spinal cord: background, not ignored
    want[BOXES["aorta"]] = major.index("aorta")
    want[BOXES["liver"]] = major.index("liver")
    np.testing.assert_array_equal(store.case("s0001").label[...], want[x0:x1, y0:y1, z0:z1])


# ------------------------------------------------------------------------------------------------
# prepare --classes stunet on v2 data
# ------------------------------------------------------------------------------------------------


def _write_case(root: Path, case_id: str, drop: tuple[str, ...] = ()) -> None:
    """A tiny TotalSegmentator-v2 case: every v2 mask file (empty unless in BOXES), minus ``drop``."""
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    ct = np.full(SHAPE, -1000, np.int16)
    ct[2:-2, 2:-2, 2:-2] = 40  # body: the crop box is [2, 22) per axis
    seg = root / case_id / "segmentations"
    seg.mkdir(parents=True)
    for box in BOXES.values():
        ct[box] = 60
    nib.save(nib.Nifti1Image(ct, affine), root / case_id / "ct.nii.gz")
    for name in load_class_map("totalseg-v2").foreground:
        if name in drop:
            continue
        m = np.zeros(SHAPE, np.uint8)
        if name in BOXES:
            m[BOXES[name]] = 1
        nib.save(nib.Nifti1Image(m, affine), seg / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def v2_store(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("fidelity") / "raw"
    _write_case(raw, "s0001")
    _write_case(raw, "s0002", drop=("liver",))  # one mask file deleted
    (raw / "meta.csv").write_text("image_id;split\ns0001;train\ns0002;train\n")
    out = raw.parent / "prepared"
    r = prepare_dataset(raw, out, classes="stunet", format="both", spacing=1.5, cases_per_shard=2)
    assert r["exit_code"] == 0 and r["ok"] == 2
    return out


def _expected_label(case_id: str) -> np.ndarray:
    """The label map prepare should store (file grid = RAS grid here), before the crop."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[BOXES["heart"]] = IGNORE
    lab[BOXES["spinal_cord"]] = IGNORE
    # map classes are written over the ignore label: the overlap with L1 stays L1
    lab[BOXES["vertebrae_L1"]] = STUNET.index("vertebrae_L1")
    lab[BOXES["aorta"]] = STUNET.index("aorta")
    if case_id == "s0001":
        lab[BOXES["liver"]] = STUNET.index("liver")
    return lab


def test_prepare_v2_for_stunet_ignores_heart_and_marks_chambers_unannotated(v2_store):
    m = json.loads((v2_store / "manifest.json").read_text())
    cm = m["class_map"]
    assert cm["name"] == "stunet" and cm["ignore_label"] == IGNORE == len(cm["labels"]) == 105
    assert m["preprocessing"]["ignore_label"] == IGNORE and m["preprocessing"]["label_dtype"] == "uint8"
    assert {"heart", "spinal_cord", "vertebrae_S1", "skull"} <= set(cm["ignored_masks"])
    assert set(cm["missing_in_every_case"]) == set(TOTALSEG_V1_ONLY)
    store = open_store(v2_store)
    wds = {c.case_id: c for c in iter_wds_cases(store.wds_shard_paths(), store.manifest)}
    for cid in ("s0001", "s0002"):
        e = store.meta(cid)
        case = store.case(cid)
        lab = case.label[...]
        (x0, x1), (y0, y1), (z0, z1) = e["geometry"]["crop_box"]
        want = _expected_label(cid)[x0:x1, y0:y1, z0:z1]
        np.testing.assert_array_equal(lab, want)  # heart voxels carry the ignore label, not background
        np.testing.assert_array_equal(wds[cid].label, lab)  # the WebDataset copy too
        assert e["ignored_voxels"] == int((want == IGNORE).sum()) > 0
        assert sum(e["class_voxels"]) + e["ignored_voxels"] == lab.size and len(e["class_voxels"]) == 105
        # unannotated: the v1 heart classes, pulmonary_artery, face everywhere ...
        missing = {STUNET.labels[k] for k in e["missing_classes"]}
        assert set(CHAMBERS) | {"pulmonary_artery", "face"} <= missing
        # ... and the liver where its mask file was deleted (recorded, not background)
        assert ("liver" in missing) == (cid == "s0002")
        # the ignore label is no class to oversample: not present, no foreground rows
        assert IGNORE not in e["present_classes"] and str(IGNORE) not in e["fg_locations"]["ranges"]
        assert (case.fg_locations[:, 0] < IGNORE).all() and len(case.fg_locations) == e["fg_locations"]["rows"]


@pytest.mark.parametrize("classes", ["auto", "stunet"])
def test_nnunet_layout_unmapped_labels_and_its_own_ignore_label(tmp_path, classes):
    """dataset.json labels the map lacks get the ignore label; nnU-Net's own "ignore" label stays one."""
    src = tmp_path / "Dataset001_Tiny"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    ct = np.full(SHAPE, -1000, np.int16)
    ct[2:-2, 2:-2, 2:-2] = 40
    lab = np.zeros(SHAPE, np.uint8)
    lab[BOXES["liver"]] = 1
    lab[BOXES["heart"]] = 2
    lab[BOXES["aorta"]] = 3  # nnU-Net's ignore label (the highest value)
    nib.save(nib.Nifti1Image(ct, affine), src / "imagesTr" / "c1_0000.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), src / "labelsTr" / "c1.nii.gz")
    (src / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "heart": 2, "ignore": 3},
        "file_ending": ".nii.gz"}))
    r = prepare_dataset(src, tmp_path / "out", classes=classes, format="zarr", spacing=1.5)
    assert r["ok"] == 1
    store = open_store(tmp_path / "out")
    ignore = store.ignore_label
    stored = store.case("c1").label[...]
    (x0, x1), (y0, y1), (z0, z1) = store.meta("c1")["geometry"]["crop_box"]
    ref = lab[x0:x1, y0:y1, z0:z1]
    if classes == "auto":
        assert store.class_map == ["background", "liver", "heart"] and ignore == 3
        np.testing.assert_array_equal(stored, ref)
    else:
        assert ignore == IGNORE and "heart" in store.manifest["class_map"]["ignored_masks"]
        assert set(np.unique(stored[ref == 2]).tolist()) == {IGNORE}  # heart has no v1 class
        assert set(np.unique(stored[ref == 1]).tolist()) == {STUNET.index("liver")}
    assert set(np.unique(stored[ref == 3]).tolist()) == {ignore}


def _stream_cfg(root: Path, *extra):
    from stunet_scale.config import load_config

    return load_config(None, [f"data.root={root}", "data.patch_size=[64,64,64]", "data.num_workers=0",
                              "data.pin_memory=false", "augmentation.device=cpu", "model.size=S",
                              "schedule.global_batch=4", "schedule.samples_per_epoch=8",
                              "data.wds_buffer_cases=2", "data.wds_patches_per_case=2", *extra])


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_batches_carry_ignore_label_and_annotated_mask(v2_store, fmt):
    from stunet_scale.config import StreamConfig
    from stunet_scale.data.stream.loader import build_train_stream

    cfg = _stream_cfg(v2_store, f"data.format={fmt}", "augmentation.enabled=false")
    plan_cases = {}
    with build_train_stream(StreamConfig.of(cfg), rank=0, world_size=1, start_step=0, device=torch.device("cpu")) as stream:
        for step, micro in stream:
            for mb in micro:
                ann = mb["annotated"]
                assert ann.dtype == torch.bool and ann.device.type == "cpu" and ann.shape == (len(ann), 105)
                for k, g in enumerate(mb["sample_index"].tolist()):
                    cid = stream.plan.sample(g).case_id if fmt == "zarr" else None
                    row = ann[k]
                    assert not row[[STUNET.index(n) for n in CHAMBERS]].any() and row[STUNET.index("aorta")]
                    liver = bool(row[STUNET.index("liver")])
                    plan_cases.setdefault(liver, 0)
                    plan_cases[liver] += 1
                    if cid is not None:
                        assert liver == (cid == "s0001")
                    # the 64^3 patch holds the whole 20^3 volume: the heart's ignore label is in the target
                    assert (mb["targets"][0][k] == IGNORE).any()
            if step == 1:
                break
    assert set(plan_cases) == {True, False}  # both cases were seen: one with the liver, one without


@pytest.mark.parametrize("interp", ["nearest", "linear"])
def test_augmentation_keeps_the_ignore_label_a_label(interp):
    S, P = [27, 27, 27], [16, 16, 16]
    lab = np.zeros(S, np.uint8)
    lab[4:23, 4:14, 4:23] = IGNORE
    lab[4:23, 14:23, 4:23] = 7
    img = np.zeros((1, *S), np.int16)
    p = sample_plan.identity_params(1)
    p["rotation"], p["spatial"] = np.array([0.3, -0.2, 0.1]), np.array(True)
    raw = raw_batch.raw_from_initial_patches([img, img], [lab, lab], [sample_plan.identity_params(1), p],
                                     [np.array([[-np.inf, np.inf, 1.0, 0.0]], np.float32)] * 2, P, S)
    _, targets = transforms.augment_batch(raw, patch=P, initial=S, ds_strides=[(1, 1, 1), (2, 2, 2)], label_interpolation=interp)
    for t in targets:
        values = set(torch.unique(t).tolist())
        assert IGNORE in values and values <= {0, 7, IGNORE}  # never blended into another value


# ------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------

C = 6  # background, 4 annotated-or-not classes, class 5; value 6 = ignore label


def _case(seed=0, b=2, size=8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, C, size, size, size, generator=g)
    target = torch.randint(0, C, (b, 1, size, size, size), generator=g)
    target[:, :, :3] = C  # the ignore label on a slab
    return logits, target


def _loss(logits, target, annotated=None, batch_dice=False):
    return DiceCELoss([1.0], batch_dice=batch_dice)(logits, target, annotated)[0]


@pytest.mark.parametrize("batch_dice", [False, True])
def test_prediction_on_ignored_voxels_does_not_change_the_loss(batch_dice):
    logits, target = _case()
    ref = _loss(logits, target, batch_dice=batch_dice)
    other = logits.clone()
    other[:, :, :3] = torch.randn(other[:, :, :3].shape) * 10  # anything at all where the label is "ignore"
    assert _loss(other, target, batch_dice=batch_dice).item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)
    control = logits.clone()
    control[:, :, 3:] = torch.randn(control[:, :, 3:].shape) * 10
    assert abs(_loss(control, target, batch_dice=batch_dice).item() - ref.item()) > 1e-3
    # gradient: exactly zero on ignored voxels
    x = logits.clone().requires_grad_()
    _loss(x, target, batch_dice=batch_dice).backward()
    assert torch.count_nonzero(x.grad[:, :, :3]) == 0 and torch.count_nonzero(x.grad[:, :, 3:]) > 0


def test_ignore_label_matches_nnunet_v2_dc_and_ce():
    pytest.importorskip("nnunetv2")
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    logits, target = _case(seed=3)
    ref = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                         weight_dice=1, ignore_label=C, dice_class=MemoryEfficientSoftDiceLoss)
    # nnU-Net returns -Dice, we return 1 - Dice
    assert _loss(logits, target).item() == pytest.approx(ref(logits, target).item() + 1, rel=1e-5, abs=1e-6)


def _move(logits, frm: int, to: int, mask=None, amount=0.7):
    """Logits whose softmax moves ``amount`` of class ``frm``'s probability to class ``to`` and leaves
    every other class's probability unchanged (at voxels ``mask``)."""
    p = torch.softmax(logits, 1)
    q = p.clone()
    d = p[:, frm] * amount
    q[:, frm] -= d
    q[:, to] += d
    out = torch.log(q)
    return out if mask is None else torch.where(mask, out, logits)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_moving_probability_between_background_and_an_unannotated_class_does_not_change_the_loss(batch_dice):
    logits, target = _case(seed=1)
    target[target == 2] = 0  # class 2 is unannotated in sample 0 ...
    target[1][target[1] == 4] = 0  # ... and class 4 in sample 1: their voxels are background in the masks
    annotated = torch.ones(2, C, dtype=torch.bool)
    annotated[0, 2] = False
    annotated[1, 4] = False
    ref = _loss(logits, target, annotated, batch_dice)
    s0 = torch.zeros(2, 1, 1, 1, 1, dtype=torch.bool)
    s0[0] = True
    # sample 0: background <-> its unannotated class 2, both ways, at every voxel
    assert _loss(_move(logits, 0, 2, s0), target, annotated, batch_dice).item() == pytest.approx(ref.item(), rel=1e-5)
    assert _loss(_move(logits, 2, 0, s0), target, annotated, batch_dice).item() == pytest.approx(ref.item(), rel=1e-5)
    # sample 1: background -> class 4
    assert _loss(_move(logits, 0, 4, ~s0), target, annotated, batch_dice).item() == pytest.approx(ref.item(), rel=1e-5)
    # controls: the same move to a class annotated in that sample, on its background voxels, raises the loss ...
    bg0 = s0 & (target == 0)
    assert _loss(_move(logits, 0, 4, bg0), target, annotated, batch_dice).item() > ref.item() + 1e-3
    assert _loss(_move(logits, 0, 1, bg0), target, annotated, batch_dice).item() > ref.item() + 1e-3
    # ... and so does the unannotated move when every class is treated as annotated (the old loss)
    assert abs(_loss(_move(logits, 0, 2, s0), target, None, batch_dice).item() - _loss(logits, target, None, batch_dice).item()) > 1e-3


def test_marginal_loss_equals_cross_entropy_with_merged_background():
    logits, target = _case(seed=2, b=1)
    target[target == 3] = 0
    annotated = torch.ones(1, C, dtype=torch.bool)
    annotated[0, 3] = False
    loss = DiceCELoss([1.0], dice_weight=0.0)(logits, target, annotated)[0]
    # reference: fold class 3 into background explicitly, ignore the slab
    p = torch.softmax(logits, 1)
    p[:, 0] += p[:, 3]
    lab = target[:, 0]
    valid = lab != C
    nll = -torch.log(p.gather(1, lab.clamp_max(C - 1)[:, None])[:, 0])[valid]
    assert loss.item() == pytest.approx(nll.mean().item(), rel=1e-5)


def test_no_annotation_flags_and_all_annotated_give_the_same_loss():
    logits, target = _case(seed=4)
    assert _loss(logits, target, torch.ones(2, C, dtype=torch.bool)).item() == _loss(logits, target).item()
    with pytest.raises(ValueError, match="annotated has shape"):
        _loss(logits, target, torch.ones(3, C, dtype=torch.bool))
    # a patch of nothing but ignored voxels: finite, zero CE (nnU-Net), a gradient of zero
    x = torch.randn(1, C, 4, 4, 4, requires_grad=True)
    loss, terms = DiceCELoss([1.0])(x, torch.full((1, 1, 4, 4, 4), C))
    loss.backward()
    assert torch.isfinite(loss) and terms["ce"].item() == 0 and torch.count_nonzero(x.grad) == 0


def test_soft_dice_leaves_ignored_voxels_out_of_every_sum():
    logits = torch.full((1, 3, 4, 4, 4), -20.0)
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[..., :2, :, :] = 1
    logits.scatter_(1, target, 20.0)
    target[..., 3, :, :] = 3  # ignored voxels, predicted background
    logits[:, 1, 3] = 40.0  # now predicted class 1: would be false positives if counted
    assert soft_dice_per_class(logits, target)[0, 1].item() == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------------------
# validation Dice
# ------------------------------------------------------------------------------------------------


def test_confusion_counts_skip_ignored_voxels_and_unannotated_classes():
    label = torch.tensor([0, 1, 1, 4, 4, 2, 0])  # 4 = ignore label of a 4-class map
    pred = torch.tensor([0, 1, 1, 1, 2, 2, 3])
    d = dice_from_counts(confusion_counts(label, pred, 4, unannotated=[3]))
    assert d[1].item() == 1.0 and d[2].item() == 1.0 and math.isnan(d[3].item())
    d = dice_from_counts(confusion_counts(label[:6], pred[:6], 4))
    assert d[1].item() == 1.0  # the predictions on the ignored voxels are not false positives
    control = dice_from_counts(confusion_counts(label, pred, 4))
    assert control[3].item() == 0.0  # the false positive of an annotated class 3 counts


def test_validator_full_skips_ignored_voxels_and_unannotated_classes():
    n = 4  # classes 0..3, ignore label 4; class 3 unannotated in the case
    label = np.zeros((8, 8, 8), np.int64)
    label[:4] = 1
    label[4:6] = n  # ignored voxels ...
    pred = label.copy()
    pred[4:6] = 1  # ... predicted as class 1 (no false positives there)
    pred[6:, :4] = 3  # class 3 predicted where the masks say background: unannotated, not penalised
    pred[7, 4:] = 2  # a real false positive of class 2: Dice 0, the control

    def forward(x):
        return torch.nn.functional.one_hot(x[:, 0].round().long(), n).permute(0, 4, 1, 2, 3).float() * 10

    cfg = SimpleNamespace(
        seed=0, model=SimpleNamespace(num_classes=n, in_channels=1), data=SimpleNamespace(patch_size=[8, 8, 8]),
        augmentation=SimpleNamespace(mirror_axes=[0, 1, 2]),
        validation=SimpleNamespace(mirroring=False, max_cases=0, step_size=0.5, enabled=True, pseudo_dice_batches=2,
                                   surface_metrics=False))
    env = SimpleNamespace(is_main=True, rank=0, world_size=1, broadcast_object=lambda o: o, all_reduce=lambda v, op: v)
    backend = SimpleNamespace(eval_forward=forward, eval=lambda: None, after_eval=lambda: None, train=lambda: None,
                              device=torch.device("cpu"))
    data = CasesDataSource({"c0": (pred[None].astype(np.float32), label, {"missing_classes": [3]})})
    v = Validator(cfg, backend, env, data, Path("."), ["background", "a", "b", "c"])
    r = v.full(0)
    assert r["per_class"]["a"] == 1.0 and r["per_class"]["b"] == 0.0 and math.isnan(r["per_class"]["c"])
    assert r["mean_dice"] == 0.5
    assert math.isfinite(v.pseudo_dice(0)["mean_dice"])


def test_loss_with_ignored_and_unannotated_voxels_does_not_depend_on_the_micro_batch_split():
    # 1 rank x 2 samples must equal the mean of 2 ranks x 1 sample (exact resume on another world
    # size): CE and Dice are per-sample means, whatever each sample's count of ignored voxels.
    from stunet_scale.train.loss import DiceCELoss

    gen = torch.Generator().manual_seed(5)
    c = 6
    logits = torch.randn(2, c, 8, 8, 8, generator=gen)
    target = torch.randint(0, c, (2, 1, 8, 8, 8), generator=gen)
    target[0, :, :5] = c  # sample 0: many ignored voxels, sample 1: none
    annotated = torch.ones(2, c, dtype=torch.bool)
    annotated[1, 3] = False
    loss = DiceCELoss([1.0], 1.0, 1.0, 1e-5, False)
    whole, _ = loss((logits,), (target,), annotated)
    parts = [loss((logits[i:i + 1],), (target[i:i + 1],), annotated[i:i + 1])[0] for i in range(2)]
    assert torch.allclose(whole, (parts[0] + parts[1]) / 2, rtol=1e-6), (whole, parts)
