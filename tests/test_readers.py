"""Zarr and WebDataset patch readers on a real prepared store (demo phantoms through prepare)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import zarr

from stunet_scale.config import AugmentationConfig
from stunet_scale.data.store import StoreIntegrityError, open_store
from stunet_scale.data.stream import counter_noise, patch_geometry, raw_batch, transforms
from stunet_scale.data.stream import plan as sample_plan
from stunet_scale.data.stream.plan import SamplePlan, SampleSpec, resolve_origin
from stunet_scale.data.stream.readers import (
    CaseHandle,
    RowReader,
    ShardReader,
    ZarrPatchReader,
    assemble_micro_batch,
    normalization,
    plan_cases,
)
from stunet_scale.data.stream.webdataset_reader import BufferPlan, _epoch_rng, consumer_shards, load_wds_case

PATCH = [64, 64, 64]
INITIAL = patch_geometry.initial_patch_size(PATCH, 30)


@pytest.fixture(scope="module")
def store(prepared_demo):
    return open_store(prepared_demo)


def _plan(store, **kw):
    return SamplePlan(plan_cases(store, ["train"]), seed=kw.pop("seed", 0), global_batch=kw.pop("global_batch", 2),
                      patch=PATCH, initial=INITIAL, aug_cfg=kw.pop("aug_cfg", AugmentationConfig()), **kw)


def test_shard_reader_reads_what_zarr_reads(store):
    cid = store.case_ids(["train"])[0]
    group = zarr.open_group(str(store.root / "store.zarr" / cid), mode="r")
    rng = np.random.default_rng(0)
    for name in ("image", "label"):
        reader = ShardReader(store.root / "store.zarr" / cid / name, cid, name)
        arr = group[name]
        assert reader.shape == arr.shape
        for _ in range(6):
            lo = [int(rng.integers(0, s - 1)) for s in arr.shape]
            hi = [int(rng.integers(a + 1, s + 1)) for a, s in zip(lo, arr.shape)]
            out = np.empty([b - a for a, b in zip(lo, hi)], reader.dtype)
            reader.read(lo, hi, out)
            np.testing.assert_array_equal(out, arr[tuple(slice(a, b) for a, b in zip(lo, hi))])
    rows = RowReader(store.root / "store.zarr" / cid / "fg_locations", cid, "fg_locations")
    table = group["fg_locations"][...]
    assert len(rows) == len(table) > 4096  # several chunks
    for r in rng.integers(0, len(table), 20):
        np.testing.assert_array_equal(rows.row(int(r)), table[r])


def test_normalisation_is_stunet_zscore_or_nnunet_ct(store):
    cid = store.case_ids(["train"])[0]
    meta = store.meta(cid)
    # zscore (default): nnU-Net's statistics of the original image over its nonzero box
    nz = meta["intensity"]["nonzero"]
    lo, hi, scale, shift = normalization(store, meta, "zscore")[0]
    assert np.isinf(lo) and np.isinf(hi)
    assert scale == pytest.approx(1 / max(nz["std"], 1e-8))
    assert -1024 * scale + shift == pytest.approx((-1024 - nz["mean"]) / nz["std"], rel=1e-5)
    # zscore_stored: the stored volume's own statistics (STU-Net v1's std + 1e-8)
    lo, hi, scale, shift = normalization(store, meta, "zscore_stored")[0]
    assert np.isinf(lo) and np.isinf(hi)
    assert scale == pytest.approx(1 / (meta["intensity"]["std"] + 1e-8))
    assert -1024 * scale + shift == pytest.approx((-1024 - meta["intensity"]["mean"]) / meta["intensity"]["std"], rel=1e-5)
    no_stats = {k: v for k, v in meta.items() if k != "intensity"}
    with pytest.raises(Exception, match="no intensity statistics"):
        normalization(store, no_stats, "zscore")
    fg = store.intensity["foreground"]
    lo, hi, scale, shift = normalization(store, meta, "ct")[0]
    assert (lo, hi) == pytest.approx((fg["percentile_00_5"], fg["percentile_99_5"]))
    assert scale == pytest.approx(1 / fg["std"]) and shift == pytest.approx(-fg["mean"] / fg["std"])


def _spec(plan, case, origin, aug=None, fg_row=-1, index=0):
    return SampleSpec(index=index, case=case, case_id=plan.cases[case].case_id, forced_fg=fg_row >= 0, fg_label=-1,
                      fg_row=fg_row, random_origin=tuple(origin), aug=aug or sample_plan.identity_params(1))


def test_outside_the_volume_is_air_and_background(store):
    plan = _plan(store)
    h = CaseHandle(store, plan.cases[0].case_id, "zscore", 1)
    off = patch_geometry.crop_offset(PATCH, INITIAL)
    # the final patch starts 20 voxels before the volume on every axis
    spec = _spec(plan, 0, [-20 - o for o in off])
    raw = assemble_micro_batch([spec], [h], plan, 1)
    img, lab = raw["crop_image"][0, 0].numpy(), raw["crop_label"][0, 0].numpy()
    assert np.all(img[:20] == -1024) and np.all(img[:, :20] == -1024) and np.all(lab[:20] == 0)
    inside = h.image.shape
    ref = np.empty([min(44, s) for s in inside], np.int16)
    h.image.read((0, 0, 0), ref.shape, ref)
    np.testing.assert_array_equal(img[20:20 + ref.shape[0], 20:20 + ref.shape[1], 20:20 + ref.shape[2]], ref)
    # normalised, the padding is exactly the case's air value
    x, _ = transforms.augment_batch(raw, patch=PATCH, initial=INITIAL, ds_strides=[(1, 1, 1)])
    _, _, scale, shift = h.norm[0]
    assert torch.allclose(x[0, 0, :20], torch.tensor(-1024 * scale + shift))


def test_forced_samples_contain_their_class(store):
    plan = _plan(store, aug_cfg=AugmentationConfig(enabled=False))
    reader = ZarrPatchReader(store, plan, normalization_mode="zscore")
    off = patch_geometry.crop_offset(PATCH, INITIAL)
    seen = set()
    for i in range(1, 80, 2):  # odd positions of a batch of 2 are forced
        spec = plan.sample(i)
        assert spec.forced_fg and spec.fg_row >= 0
        h = reader.case(spec.case_id)
        voxel = h.fg_voxel(spec.fg_row)
        origin = [o + d for o, d in zip(resolve_origin(spec, h.shape, INITIAL, PATCH, voxel), off)]
        pos = [int(v - o) for v, o in zip(voxel, origin)]
        assert all(0 <= p < n for p, n in zip(pos, PATCH))
        raw = reader.read_micro_batch([i])
        assert raw["crop_label"][0, 0][tuple(pos)] == spec.fg_label
        seen.add(spec.fg_label)
    assert len(seen) > 5  # many classes, not the biggest one over and over


def test_box_read_equals_reading_the_whole_initial_patch(store):
    """Reading only the box the rotated grid touches changes nothing in the augmented result."""
    plan = _plan(store, aug_cfg=AugmentationConfig(rotation_p=1.0, scaling_p=1.0))
    reader = ZarrPatchReader(store, plan, normalization_mode="zscore")
    for i in (0, 2, 4):
        spec = plan.sample(i)
        assert spec.spatial
        raw = reader.read_micro_batch([i])
        h = reader.case(spec.case_id)
        origin = resolve_origin(spec, h.shape, INITIAL, PATCH, None)
        group = zarr.open_group(str(store.root / "store.zarr" / spec.case_id), mode="r")
        full_img = np.full(INITIAL, -1024, np.int16)
        full_lab = np.zeros(INITIAL, np.uint8)
        a = [max(0, o) for o in origin]
        b = [min(s, o + n) for s, o, n in zip(h.shape, origin, INITIAL)]
        dst = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, origin))
        full_img[dst] = group["image"][tuple(slice(x, y) for x, y in zip(a, b))]
        full_lab[dst] = group["label"][tuple(slice(x, y) for x, y in zip(a, b))]
        ref = raw_batch.raw_from_initial_patches([full_img[None]], [full_lab], [spec.aug], [h.norm], PATCH, INITIAL)
        lo, hi = patch_geometry.spatial_read_box(spec.aug, PATCH, INITIAL)
        assert np.prod(np.subtract(hi, lo)) <= np.prod(INITIAL)
        x1, t1 = transforms.augment_batch(raw, patch=PATCH, initial=INITIAL, ds_strides=[(1, 1, 1)])
        x2, t2 = transforms.augment_batch(ref, patch=PATCH, initial=INITIAL, ds_strides=[(1, 1, 1)])
        assert torch.equal(x1, x2) and torch.equal(t1[0], t2[0])


def test_damaged_chunks_raise_naming_case_and_chunk(prepared_demo, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(prepared_demo, root)
    store = open_store(root)
    cid = store.case_ids(["train"])[0]
    shard = root / "store.zarr" / cid / "image" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    reader = ShardReader(root / "store.zarr" / cid / "image", cid, "image")
    fd = os.open(shard, os.O_RDONLY)
    index = reader._index((0, 0, 0), fd, len(data))
    os.close(fd)
    off, n = (int(v) for v in index[1, 0, 0])
    data[off + n // 2] ^= 0xFF  # flip bits inside inner chunk (1, 0, 0), same file size
    shard.write_bytes(bytes(data))
    h = CaseHandle(store, cid, "zscore", 1)
    out = np.empty((64, 64, 64), np.int16)
    h.image.read((0, 0, 0), (64, 64, 64), out)  # an intact chunk still reads
    with pytest.raises(StoreIntegrityError, match=rf"case '{cid}'.*inner chunk \(1, 0, 0\)"):
        h.image.read((64, 0, 0), (80, 10, 10), np.empty((16, 10, 10), np.int16))
    (root / "store.zarr" / cid / "label" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreIntegrityError, match=rf"case '{cid}'.*label.*missing"):
        CaseHandle(store, cid, "zscore", 1)


def test_a_box_read_touches_only_the_chunks_under_it_and_opens_its_shard_once(store, monkeypatch):
    from stunet_scale.data.stream import readers as R

    cid = store.case_ids(["train"])[0]
    reader = ShardReader(store.root / "store.zarr" / cid / "image", cid, "image")
    group = zarr.open_group(str(store.root / "store.zarr" / cid), mode="r")
    c = reader.chunk
    assert all(n > ch for n, ch in zip(reader.shape, c))  # at least two chunks per axis
    reads, opens = [], []
    real_preadv, real_open = R.os.preadv, R.os.open
    monkeypatch.setattr(R.os, "preadv", lambda fd, bufs, off: (reads.append(off), real_preadv(fd, bufs, off))[1])
    monkeypatch.setattr(R.os, "open", lambda *a, **k: (opens.append(a[0]), real_open(*a, **k))[1])
    fd, size = reader._open((0, 0, 0))
    index = reader._index((0, 0, 0), fd, size)
    opens.clear()
    for lo, hi, chunks in (
        ((1, 2, 3), (9, 10, 11), [(0, 0, 0)]),  # inside one chunk
        ((c[0] - 2, 5, 5), (c[0] + 2, 9, 9), [(0, 0, 0), (1, 0, 0)]),  # straddles one boundary
        ([x - 1 for x in c], [x + 1 for x in c], list(np.ndindex(2, 2, 2))),  # the corner of eight
    ):
        reads.clear()
        out = np.empty([b - a for a, b in zip(lo, hi)], reader.dtype)
        reader.read(lo, hi, out)
        np.testing.assert_array_equal(out, group["image"][tuple(slice(a, b) for a, b in zip(lo, hi))])
        assert sorted(reads) == sorted(int(index[ch][0]) for ch in chunks), (lo, hi)
    assert opens == []  # the shard stays open between reads: no open/fstat per box
    reader.close()
    assert reader._fds == {}


def test_webdataset_sample_whose_meta_names_another_case_is_rejected(store):
    from stunet_scale.data.store import decode_wds_sample, iter_wds_groups, wds_key

    shard = store.manifest["wds_shards"][0]
    path = store.root / shard["path"]
    groups = list(iter_wds_groups(path, [wds_key(c) for c in shard["cases"]]))
    assert decode_wds_sample(groups[0], store.manifest).case_id == shard["cases"][0]
    other = next(g for g in (c for s in store.manifest["wds_shards"] for c in s["cases"]) if g != shard["cases"][0])
    spliced = dict(groups[0])
    spliced["meta.json"] = json.dumps({**json.loads(groups[0]["meta.json"]), "id": other}).encode()
    for manifest in (None, store.manifest):
        with pytest.raises(StoreIntegrityError, match=rf"shard {path}: sample '{groups[0]['__key__']}'.*names case '{other}'"):
            decode_wds_sample(spliced, manifest)


def test_webdataset_consumers_always_get_shards_and_streams_are_deterministic():
    for n_shards, consumers in ((1, 4), (3, 8), (10, 4), (8, 8)):
        lists = [consumer_shards(n_shards, 0, 0, c, consumers) for c in range(consumers)]
        assert all(len(x) >= 1 for x in lists)
        assert set().union(*map(set, lists)) == set(range(n_shards))
        assert lists == [consumer_shards(n_shards, 0, 0, c, consumers) for c in range(consumers)]
    assert [consumer_shards(10, 0, e, 0, 4) for e in range(3)] != [consumer_shards(10, 0, 0, 0, 4)] * 3
    a, b = BufferPlan(_epoch_rng(0, 1, 2), 3, 4), BufferPlan(_epoch_rng(0, 1, 2), 3, 4)
    qa = [a.advance() for _ in range(40)]
    assert qa == [b.advance() for _ in range(40)]
    assert max(np.bincount(qa)) <= 4 and len(a.live()) == 3  # K patches per volume, buffer of 3


def test_webdataset_case_equals_the_zarr_case(store):
    cid = store.case_ids(["train"])[1]
    case = load_wds_case(store, cid)
    group = zarr.open_group(str(store.root / "store.zarr" / cid), mode="r")
    np.testing.assert_array_equal(np.asarray(case.image), group["image"][...])
    np.testing.assert_array_equal(np.asarray(case.label), group["label"][...])


def test_labels_use_the_fast_codec_and_stores_with_bitshuffled_labels_still_read(store, tmp_path, monkeypatch):
    from stunet_scale.data import store as st
    from stunet_scale.data.ingest import store_writer

    # the manifest records each array's codec; the label array is written with it
    codecs = store.manifest["storage"]["codecs"]
    assert codecs["label"]["blosc"] == st.LABEL_BLOSC and codecs["image"]["blosc"] == st.BLOSC
    assert st.LABEL_BLOSC["shuffle"] == "noshuffle" and st.BLOSC["shuffle"] == "bitshuffle"
    cid = store.case_ids(["train"])[0]
    for name, want in (("label", st.LABEL_BLOSC), ("image", st.BLOSC)):
        meta = json.loads((store.root / "store.zarr" / cid / name / "zarr.json").read_text())
        (blosc,) = [c for c in meta["codecs"][0]["configuration"]["codecs"] if c["name"] == "blosc"]
        assert {k: blosc["configuration"][k] for k in want} == want
    # a store written before labels had their own codec (bitshuffled like the image) reads the same
    rng = np.random.default_rng(0)
    image = rng.integers(-1024, 1500, (70, 66, 65)).astype(np.int16)
    label = np.kron(rng.integers(0, 30, (5, 5, 5)), np.ones((14, 14, 14)))[:70, :66, :65].astype(np.uint8)
    fg = np.array([[1, 2, 3, 4]], np.int32)
    monkeypatch.setitem(st.CODECS, "label", st.BLOSC)
    store_writer.write_case_zarr(tmp_path / "old", image, label, fg, {})
    members = dict(store_writer.encode_wds_case("old", image, label, fg, {"id": "old", "checksums": {
        "image": st.array_checksum(image), "label": st.array_checksum(label), "fg_locations": st.array_checksum(fg)},
        "image_shape": list(image.shape), "image_dtype": "int16", "shape": list(label.shape), "label_dtype": "uint8",
        "fg_locations": {"rows": 1}}))
    monkeypatch.undo()
    meta = json.loads((tmp_path / "old" / "label" / "zarr.json").read_text())
    assert "bitshuffle" in json.dumps(meta)
    for name, want in (("label", label), ("image", image)):
        reader = ShardReader(tmp_path / "old" / name, "old", name)
        out = np.empty((40, 50, 33), want.dtype)
        reader.read((20, 10, 30), (60, 60, 63), out)
        np.testing.assert_array_equal(out, want[20:60, 10:60, 30:63])
    sample = {"__key__": "old", "__url__": "old.tar", **{k.split(".", 1)[1]: v for k, v in members.items()}}
    case = st.decode_wds_sample(sample)
    np.testing.assert_array_equal(case.label, label)
    np.testing.assert_array_equal(case.image, image)
    # and the new codec really differs on the wire (no bitshuffle flag in the blosc header)
    new = dict(store_writer.encode_wds_case("new", image, label, fg, {}))
    assert new["new.label.blosc"][2] & 0x4 == 0 and members["old.label.blosc"][2] & 0x4


def test_noisy_samples_carry_only_their_plan_key(store):
    plan = _plan(store, aug_cfg=AugmentationConfig(noise_p=1.0))
    raw = ZarrPatchReader(store, plan, normalization_mode="zscore").read_micro_batch([4, 5])
    assert raw["noise_pos"].tolist() == [0, 1] and "noise" not in raw  # no float field in the raw batch
    keys = raw["noise_key"].tolist()
    assert keys == [plan.noise_key(4), plan.noise_key(5)] and keys[0] != keys[1]
    assert keys == [_plan(store, aug_cfg=AugmentationConfig(noise_p=1.0)).noise_key(i) for i in (4, 5)]
    np.testing.assert_array_equal(plan.noise_field(4, (1, 8, 8, 8)), counter_noise.gaussian_noise(keys[0], (1, 8, 8, 8)).numpy())
