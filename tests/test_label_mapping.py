"""`predict --label-map` (stunet_scale/label_mapping.py): shipped maps valid, sources merged, clear errors,
and the mapped output scored by `evaluate` by name and by target id. Fast: a stand-in network on a tiny CT."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from stunet_scale.cli import main
from stunet_scale.data.class_maps import load_class_map
from stunet_scale.evaluate import evaluate
from stunet_scale.export.spec import ModelSpec
from stunet_scale.label_mapping import (
    SHIPPED,
    LabelMapError,
    load_label_map,
    shipped_path,
)
from stunet_scale.models import ModelConfig
from stunet_scale.predict import PredictError, predict

MODEL_LABELS = ["background", "kidney_left", "kidney_right", "spleen"]
INTENSITY = {"kidney_left": 100.0, "kidney_right": 200.0, "spleen": 300.0}
SHAPE = (24, 20, 16)
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])


def _write_map(path, labels, unmapped=None, source_classes="totalsegmentator_v1"):
    path.write_text(json.dumps({"name": "test", "source_classes": source_classes, "labels": labels,
                                "unmapped": unmapped or {}}))
    return path


def test_shipped_maps_load_and_cover_their_datasets():
    stunet = list(load_class_map("stunet").labels)  # the released models' head: background + sorted v1 names
    expected = {"btcv": (13, 0), "amos22": (14, 1), "flare22": (13, 0)}
    for name in SHIPPED:
        m = load_label_map(name)
        mapped, unmapped = expected[name]
        assert (len(m.targets), len(m.unmapped)) == (mapped, unmapped)
        # ids 1..N, each either mapped or listed as unmapped with a reason: nothing silently dropped
        assert sorted([*m.targets, *m.unmapped]) == list(range(1, mapped + unmapped + 1))
        assert m.target_reference and json.loads(shipped_path(name).read_text())["target_reference"]
        table = m.lookup_table(stunet)
        assert sorted(set(table.tolist()) - {0}) == sorted(m.targets)
    amos = load_label_map("amos22")
    assert amos.unmapped[15]["name"] == "prostate/uterus" and "v1" in amos.unmapped[15]["reason"]
    assert amos.targets[8] == ("arota", ("aorta",)) and amos.targets[14] == ("bladder", ("urinary_bladder",))
    assert load_label_map("flare22").targets[13] == ("left kidney", ("kidney_left",))
    assert load_label_map("btcv").targets[10] == ("portal vein and splenic vein", ("portal_vein_and_splenic_vein",))


def test_merge_and_background_for_unlisted_sources(tmp_path):
    m = load_label_map(_write_map(tmp_path / "m.json", {"1": {"name": "kidney", "from": ["kidney_left", "kidney_right"]}}))
    table = m.lookup_table(MODEL_LABELS)
    assert table.tolist() == [0, 1, 1, 0]  # spleen is in no target: background
    out = m.apply(np.array([[0, 1], [2, 3]]), table)
    assert out.tolist() == [[0, 1], [1, 0]] and out.dtype == np.uint8


@pytest.mark.parametrize("labels, unmapped, match", [
    ({"1": {"name": "kidney", "from": ["kidney_lft"]}}, None, "unknown source class 'kidney_lft'.*kidney_left"),
    ({"1": {"name": "kidney", "from": []}}, None, "'kidney' \\(1\\) is mapped from nothing"),
    ({"1": {"name": "a", "from": ["spleen"]}, "2": {"name": "b", "from": ["spleen"]}}, None, "'spleen' is mapped to both"),
    ({"1": {"name": "a", "from": ["spleen"]}, "2": {"name": "a", "from": ["liver"]}}, None, "target name.*'a'"),
    ({"0": {"name": "a", "from": ["spleen"]}}, None, "key '0' is not a label id > 0"),
    ({"1": {"name": "a", "from": ["spleen"]}}, {"1": {"name": "x", "reason": "r"}}, "both in labels and in unmapped"),
    ({"1": {"name": "a", "from": ["spleen"]}}, {"2": {"name": "x"}}, "needs a \"name\" and a \"reason\""),
])
def test_bad_maps_name_the_file_and_the_name(tmp_path, labels, unmapped, match):
    path = _write_map(tmp_path / "bad_map.json", labels, unmapped)
    with pytest.raises(LabelMapError, match=match) as e:
        load_label_map(path)
    assert "bad_map.json" in str(e.value)


def test_other_errors(tmp_path):
    with pytest.raises(LabelMapError, match="shipped map"):
        load_label_map("no_such_map")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(LabelMapError, match="x.json: not readable JSON"):
        load_label_map(tmp_path / "x.json")
    with pytest.raises(LabelMapError, match="source_classes 'v3'"):
        load_label_map(_write_map(tmp_path / "y.json", {"1": {"name": "a", "from": ["spleen"]}}, source_classes="v3"))
    # a model trained on fewer classes cannot serve a map that needs more
    with pytest.raises(LabelMapError, match="btcv.json: the model does not predict.*liver"):
        load_label_map("btcv").lookup_table(MODEL_LABELS)


class IntensityClasses(torch.nn.Module):
    """A stand-in network: the class whose (normalised) intensity is nearest to the voxel's."""

    def __init__(self, centres):
        super().__init__()
        self.centres = torch.tensor(centres, dtype=torch.float32).view(1, -1, 1, 1, 1)

    def forward(self, x):
        return -(x[:, :1] - self.centres).abs()


def _case(tmp_path):
    image = np.zeros(SHAPE, np.float32)
    truth = np.zeros(SHAPE, np.uint8)
    boxes = {"kidney_left": np.s_[2:9, 3:10, 3:12], "kidney_right": np.s_[13:21, 3:10, 3:12], "spleen": np.s_[6:18, 12:18, 4:13]}
    for name, box in boxes.items():
        image[box] = INTENSITY[name]
        truth[box] = MODEL_LABELS.index(name)
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "ct.nii.gz"))
    centres = [(v - image.mean()) / image.std() for v in (0.0, *INTENSITY.values())]
    model = dataclasses.asdict(ModelConfig(size=None, base_width=2, blocks_per_stage=1, num_classes=4).resolved())
    spec = ModelSpec(model=model, spacing=[1.5, 1.5, 1.5], patch_size=[16, 16, 16], crop="none", axis_order="ras_xyz",
                     labels=MODEL_LABELS)
    return IntensityClasses(centres), spec, truth


def test_predict_with_label_map_merges_and_evaluate_scores_it(tmp_path):
    network, spec, truth = _case(tmp_path)
    mp = _write_map(tmp_path / "organs.json", {"1": {"name": "kidney", "from": ["kidney_left", "kidney_right"]},
                                               "2": {"name": "spleen", "from": ["spleen"]}},
                    unmapped={"3": {"name": "liver", "reason": "not in this test model"}})
    out = tmp_path / "pred" / "c1.nii.gz"
    res = predict("stand-in", tmp_path / "ct.nii.gz", out, network=network, spec=spec, device="cpu", label_map=mp)
    assert res["written"] == [str(out)]
    seg = np.asarray(nib.load(str(out)).dataobj)
    expected = np.select([np.isin(truth, [1, 2]), truth == 3], [1, 2], 0)
    assert (seg == expected).mean() > 0.97 and set(np.unique(seg)) == {0, 1, 2}
    info = json.loads((tmp_path / "pred" / "c1.labels.json").read_text())
    assert info["labels"] == {"0": "background", "1": "kidney", "2": "spleen"}
    assert info["sources"]["kidney"] == ["kidney_left", "kidney_right"] and info["unmapped"]["3"]["name"] == "liver"
    # a reference in the target's label set: paired by name through its dataset.json ...
    raw = tmp_path / "Dataset001_T"
    (raw / "labelsTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(expected.astype(np.uint8), AFFINE), str(raw / "labelsTr" / "c1.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "spleen": 2}}))
    ev = evaluate(tmp_path / "pred", raw / "labelsTr", metrics=("dice",))
    assert ev.per_class()["kidney"] > 0.95 and ev.per_class()["spleen"] > 0.95
    # ... or by target id, naming the reference's values with the same labels.json (other spellings in dataset.json)
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Kidneys": 1, "Spleen": 2}}))
    assert main(["evaluate", str(tmp_path / "pred"), str(raw / "labelsTr"), "--reference-labels",
                 str(tmp_path / "pred" / "c1.labels.json"), "--metrics", "dice", "--goal", "0.95"]) == 0


def test_predict_label_map_errors(tmp_path):
    network, spec, _ = _case(tmp_path)
    with pytest.raises(PredictError, match="btcv.json: the model does not predict"):
        predict("stand-in", tmp_path / "ct.nii.gz", tmp_path / "o.nii.gz", network=network, spec=spec, device="cpu",
                label_map="btcv")
    with pytest.raises(PredictError, match="--classes and --label-map"):
        predict("stand-in", tmp_path / "ct.nii.gz", tmp_path / "o.nii.gz", network=network, spec=spec, device="cpu",
                label_map="btcv", classes=["spleen"])
