"""The trainer's data API: determinism across workers, resume, world sizes; device parity; validation; WebDataset."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from stunet_scale.config import ConfigError, StreamConfig, load_config
from stunet_scale.data.stream.loader import StoreDataSource, build_train_stream

CPU = torch.device("cpu")


def _cfg(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.patch_size=[64,64,64]", "data.num_workers=0",
                              "data.pin_memory=false", "augmentation.device=cpu", "model.size=S", *overrides])


def _take(cfg, steps, start=0, rank=0, world=1, device=CPU, **kw):
    out = []
    with build_train_stream(StreamConfig.of(cfg), rank=rank, world_size=world, start_step=start, device=device, **kw) as stream:
        for step, micro in stream:
            out.append((step, micro))
            if step == start + steps - 1:
                break
        state = stream.state_dict()
    return out, state


def _by_index(batches):
    """{global sample index: (image, full-res target)} over all micro-batches."""
    got = {}
    for _, micro in batches:
        for mb in micro:
            for k, g in enumerate(mb["sample_index"].tolist()):
                got[g] = (mb["image"][k], mb["targets"][0][k])
    return got


def _assert_same(a, b, exact=True, tol=1e-5, label_tol=1e-4):
    assert a.keys() == b.keys()
    for g in a:
        if exact:
            assert torch.equal(a[g][0], b[g][0]), g
        else:
            torch.testing.assert_close(a[g][0], b[g][0], atol=tol, rtol=tol)
        assert (a[g][1] != b[g][1]).float().mean() < label_tol, g


def test_micro_batches_have_the_documented_shapes(prepared_demo):
    cfg = _cfg(prepared_demo, "schedule.global_batch=4")
    batches, state = _take(cfg, 3)
    assert state == {"seed": 0, "step": 3}
    for step, micro in batches:
        assert len(micro) == 2  # accumulation = 4 / (2 x 1)
        for mb in micro:
            assert mb["image"].dtype == torch.float32 and mb["image"].shape == (2, 1, 64, 64, 64)
            assert [tuple(t.shape[2:]) for t in mb["targets"]] == [(64,) * 3, (32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3]
            assert all(t.dtype == torch.int64 and t.shape[:2] == (2, 1) for t in mb["targets"])
        assert sorted(i for mb in micro for i in mb["sample_index"].tolist()) == list(range(4 * step, 4 * step + 4))
    assert torch.isfinite(batches[0][1][0]["image"]).all()


def test_a_patch_larger_than_every_volume_is_padded(prepared_demo):
    shapes = [json.load(open(prepared_demo / "manifest.json"))["cases"][c]["shape"] for c in ("s0001", "s0002", "s0003")]
    assert all(min(s) < 128 for s in shapes)
    batches, _ = _take(_cfg(prepared_demo, "data.patch_size=[128,128,128]", "augmentation.enabled=false"), 1)
    mb = batches[0][1][0]
    assert mb["image"].shape == (2, 1, 128, 128, 128) and torch.isfinite(mb["image"]).all()
    # every case is < 128 voxels along some axis: >= (128 - that extent) slabs of padding, all one
    # value (air, -1024 HU, normalised) and background
    pad = (128 - max(min(s) for s in shapes)) * 128 * 128
    for x, t in zip(mb["image"], mb["targets"][0]):
        _, counts = torch.unique(x, return_counts=True)
        assert counts.max() >= pad
        assert (t == 0).sum() >= pad


def test_same_samples_for_0_and_4_workers(prepared_demo):
    # workers read and the main process augments (the GPU path, on the CPU): bitwise identical
    a, _ = _take(_cfg(prepared_demo, "augmentation.device=gpu"), 8)
    b, _ = _take(_cfg(prepared_demo, "augmentation.device=gpu", "data.num_workers=4", "data.prefetch_factor=1"), 8)
    _assert_same(_by_index(a), _by_index(b))
    # augmenting inside the workers too: equal up to float rounding (torch reductions such as the
    # mean in contrast/gamma sum in a different order with 1 thread per worker than with 2)
    c, _ = _take(_cfg(prepared_demo, "data.num_workers=4", "data.prefetch_factor=1"), 8)
    _assert_same(_by_index(a), _by_index(c), exact=False)


def test_resume_from_seed_and_step_continues_the_exact_sequence(prepared_demo):
    cfg = _cfg(prepared_demo, "data.num_workers=2")
    full, _ = _take(cfg, 10)
    first, state = _take(cfg, 6)
    assert state == {"seed": 0, "step": 6}
    resumed, _ = _take(cfg, 4, start=state["step"])
    assert [s for s, _ in resumed] == [6, 7, 8, 9]
    _assert_same(_by_index(full[6:]), _by_index(resumed))
    _assert_same(_by_index(full[:6]), _by_index(first))


def test_global_batches_are_the_same_for_world_size_1_2_4(prepared_demo):
    cfg = _cfg(prepared_demo, "schedule.global_batch=8")
    ref = _by_index(_take(cfg, 2)[0])
    assert sorted(ref) == list(range(16))
    for world in (2, 4):
        got = {}
        for rank in range(world):
            got.update(_by_index(_take(cfg, 2, rank=rank, world=world)[0]))
        _assert_same(ref, got)


def test_worker_augmentation_equals_the_device_path_run_on_cpu(prepared_demo, monkeypatch):
    """augmentation.device=cpu augments in the workers; gpu augments in the main process on the
    rank's device (here the CPU): the same parameters through the other code path. The raw batches
    of the gpu path come in the workers' recycled shared-memory slabs, released after augmentation
    (a slab overwritten while in use would change the result)."""
    from stunet_scale.data.stream.shared_slabs import SlabPool

    released = []
    original = SlabPool.release
    monkeypatch.setattr(SlabPool, "release", lambda self, t: (released.append(t), original(self, t))[1])
    workers = _cfg(prepared_demo, "data.num_workers=2", "augmentation.rotation_p=0.5", "augmentation.noise_p=0.5")
    device = _cfg(prepared_demo, "data.num_workers=2", "augmentation.rotation_p=0.5", "augmentation.noise_p=0.5",
                  "augmentation.device=gpu", "data.prefetch_factor=1")
    a, b = _by_index(_take(workers, 6)[0]), _by_index(_take(device, 6)[0])
    _assert_same(a, b, exact=False)
    tickets = [tuple(t) for t in released if t is not None]
    assert len(tickets) == len(released) == 6  # every micro-batch came in a slab (3 slots per worker) ...
    assert max(tickets.count(t) for t in set(tickets)) >= 2  # ... and slabs were reused


def test_batched_spatial_path_equals_the_per_sample_path_on_cpu(prepared_demo):
    """On a CPU augment_batch picks the per-sample box path for rotated/scaled samples; a GPU runs
    them through one batched grid_sample in the initial-patch frame. Forcing the batched path on the
    CPU checks the GPU path's arithmetic against the workers' without a GPU."""
    over = ("augmentation.rotation_p=0.5", "augmentation.scaling_p=0.5", "augmentation.noise_p=0.5")
    workers = _cfg(prepared_demo, *over)
    device = _cfg(prepared_demo, *over, "augmentation.device=gpu")
    batches, _ = _take(device, 4, batched_spatial=True)
    a, b = _by_index(_take(workers, 4)[0]), _by_index(batches)
    plan_spatial = []
    with build_train_stream(StreamConfig.of(workers), rank=0, world_size=1, start_step=0, device=CPU) as stream:
        plan_spatial = [stream.plan.sample(g).spatial for g in a]
    assert sum(plan_spatial) >= 2  # the batched path really ran, on more than one sample
    # the two frames (initial patch vs the sample's box) round grid coordinates differently: the
    # tolerance of tests/test_augment.py's synthetic version of this check
    _assert_same(a, b, exact=False, tol=1e-4, label_tol=1e-3)


def test_slab_pool_recycles_and_never_overwrites_a_batch_in_flight():
    from stunet_scale.data.stream.shared_slabs import SlabPool

    pool = SlabPool(workers=1, slots=2)
    specs = [((2, 1, 8, 8, 8), torch.int16), ((2, 1, 8, 8, 8), torch.uint8), ((1, 5, 6, 7), torch.int16)]
    assert pool.carve(specs)[1] is None  # not a worker: private tensors, nothing to release
    pool.worker = 0
    (a, ticket_a), (b, ticket_b) = pool.carve(specs), pool.carve(specs)
    assert ticket_a == (0, 0) and ticket_b == (0, 1) and all(t.is_shared() for t in a + b)
    for i, t in enumerate(a):  # the views of one slab do not overlap
        t.fill_(i + 1)
    assert [int(t.unique().item()) for t in a] == [1, 2, 3] and [tuple(t.shape) for t in a] == [s for s, _ in specs]
    c, ticket_c = pool.carve(specs)  # both slots in flight: a fresh segment, the batches in flight untouched
    assert ticket_c is None and pool.fresh == 1 and [int(t.unique().item()) for t in a] == [1, 2, 3]
    pool.release(ticket_a)
    d, ticket_d = pool.carve(specs)
    assert ticket_d == (0, 0) and d[0].untyped_storage().data_ptr() == a[0].untyped_storage().data_ptr()
    pool.release(ticket_d)
    big = [((64, 64, 64), torch.int16)]  # larger than slot 0's slab: the free slot gets a bigger one
    e, ticket_e = pool.carve(big)
    assert ticket_e == (0, 0) and e[0].untyped_storage().nbytes() >= 64 ** 3 * 2
    assert pool.state.tolist() == [[1, 1]]


@pytest.mark.gpu
def test_cuda_device_path_matches_cpu_workers(prepared_demo):
    cpu = _cfg(prepared_demo, "data.num_workers=2", "augmentation.rotation_p=0.5")
    gpu = _cfg(prepared_demo, "data.num_workers=2", "augmentation.rotation_p=0.5", "augmentation.device=gpu",
               "data.pin_memory=true")
    a = _by_index(_take(cpu, 4)[0])
    b = {g: (x.cpu(), t.cpu()) for g, (x, t) in _by_index(_take(gpu, 4, device=torch.device("cuda"))[0]).items()}
    for g in a:
        torch.testing.assert_close(a[g][0], b[g][0], atol=1e-3, rtol=1e-3)
        assert (a[g][1] != b[g][1]).float().mean() < 1e-3


def test_close_stops_workers_quickly(prepared_demo):
    stream = build_train_stream(StreamConfig.of(_cfg(prepared_demo, "data.num_workers=2")), rank=0, world_size=1, start_step=0, device=CPU)
    it = iter(stream)
    next(it)
    t = time.perf_counter()
    stream.close()
    assert time.perf_counter() - t < 10
    stream.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        iter(stream).__next__()


def test_config_errors_name_the_key(prepared_demo, tmp_path):
    # the checks run once, in the pre-flight every rank (and the CLI, and --dry-run) calls
    from stunet_scale.train.preflight import validate

    with pytest.raises(ConfigError, match=r"data.root=.*stunet-scale prepare"):
        build_train_stream(StreamConfig.of(_cfg(tmp_path / "nope")), rank=0, world_size=1, start_step=0, device=CPU)
    with pytest.raises(ConfigError, match=r"data.root=.*stunet-scale prepare"):
        validate(_cfg(tmp_path / "nope"), world_size=1)
    cases = [
        (("data.spacing=[2.0,2.0,2.0]",), 1, r"data.spacing"),
        (("data.class_map=totalseg-v2",), 1, r"data.class_map"),
        (("model.num_classes=118",), 1, r"model.num_classes=118 .* 105"),
        (("data.train_splits=[nosuch]",), 1, r"data.train_splits"),
        (("model.in_channels=2",), 1, r"model.in_channels"),
        (("schedule.global_batch=6",), 2, r"schedule.global_batch"),
        (("data.case_weighting=split", "data.split_weights=[1,2]"), 1, r"data.split_weights"),
        (("augmentation.gamma_range=[1.5,0.7]",), 1, r"augmentation.gamma_range"),
        (("augmentation.mirror_axes=[0,3]",), 1, r"augmentation.mirror_axes"),
    ]
    for overrides, world, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            validate(_cfg(prepared_demo, *overrides), world_size=world)


def test_validation_cases_are_normalised_like_training(prepared_demo):
    cfg = _cfg(prepared_demo)
    source = StoreDataSource(StreamConfig.of(cfg))
    ids = source.validation_case_ids()
    assert ids == ["s0004"]
    image, label, meta = source.validation_case(ids[0])
    assert source.validation_case_shape(ids[0]) == tuple(meta["shape"])
    assert image.dtype == np.float32 and image.shape == (1, *meta["shape"])
    assert label.dtype == np.int64 and label.shape == tuple(meta["shape"]) and label.max() > 0
    # default: nnU-Net's per-image z-score, statistics of the original image over its nonzero box
    nz = meta["intensity"]["nonzero"]
    stored, _, _ = StoreDataSource(StreamConfig.of(_cfg(prepared_demo, "data.normalization=zscore_stored"))).validation_case(ids[0])
    raw = stored * meta["intensity"]["std"] + meta["intensity"]["mean"]  # back to HU
    np.testing.assert_allclose(image, (raw - nz["mean"]) / nz["std"], atol=1e-3)
    # zscore_stored: over the stored (body-cropped) volume: mean 0, std 1
    assert abs(float(stored.mean())) < 1e-3 and abs(float(stored.std()) - 1) < 1e-3
    # the demo phantoms have air around the body: nnU-Net's box includes it, the stored crop does not
    assert nz["mean"] < meta["intensity"]["mean"] - 50
    # nnU-Net CT: clip to the pooled foreground 0.5/99.5 percentiles, z-score with the pooled stats
    fg = json.load(open(prepared_demo / "manifest.json"))["intensity"]["foreground"]
    ct_image, _, _ = StoreDataSource(StreamConfig.of(_cfg(prepared_demo, "data.normalization=ct"))).validation_case(ids[0])
    lo = (fg["percentile_00_5"] - fg["mean"]) / fg["std"]
    hi = (fg["percentile_99_5"] - fg["mean"]) / fg["std"]
    assert ct_image.min() == pytest.approx(lo, abs=1e-4) and ct_image.max() == pytest.approx(hi, abs=1e-4)


# --------------------------------------------------------------------------------------------
# WebDataset
# --------------------------------------------------------------------------------------------


def test_webdataset_stream_resumes_mid_epoch_exactly(prepared_demo):
    cfg = _cfg(prepared_demo, "data.format=wds", "data.num_workers=2", "schedule.samples_per_epoch=8",
               "data.wds_buffer_cases=2", "data.wds_patches_per_case=3")
    full, _ = _take(cfg, 9)
    resumed, _ = _take(cfg, 4, start=5)  # 4 steps per epoch: resume inside epoch 1
    _assert_same(_by_index(full[5:]), _by_index(resumed))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wds_rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    from stunet_scale.data.stream.loader import build_plan, make_loader, open_training_store
    from stunet_scale.data.stream.transforms import Geometry
    from stunet_scale.data.stream.webdataset_reader import WdsMicroBatches

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = _cfg(root, "data.format=wds", "data.num_workers=2", "schedule.global_batch=4",
               "schedule.samples_per_epoch=20", "data.wds_patches_per_case=2")
    cfg = StreamConfig.of(cfg)
    store = open_training_store(cfg)
    geometry = Geometry(cfg)
    plan = build_plan(cfg, store, geometry)
    ds = WdsMicroBatches(store, plan, geometry, cfg, rank=rank, world_size=world, micro_batch=2, accumulation=1,
                         start_step=0, augment_in_worker=False, epochs=1)
    count, indices = 0, []
    for raw in make_loader(ds, cfg):
        # a collective per micro-batch: a rank with fewer batches would leave the other hanging here
        t = torch.ones(1)
        dist.all_reduce(t)
        count += 1
        indices += raw["sample_index"].tolist()
    counts = [None] * world
    dist.all_gather_object(counts, count)
    with open(out, "w") as f:
        json.dump({"counts": counts, "indices": indices, "shards": len(ds.shards),
                   "consumers": world * cfg.data.num_workers, "expected": ds.micro_batches_per_epoch()}, f)
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_webdataset_ranks_yield_equal_batches_with_fewer_shards_than_consumers(prepared_demo, tmp_path):
    port = _free_port()
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    # fork: the ranks' DataLoader workers then fork too (a spawned rank would spawn its workers,
    # re-importing torch in each: ~15 s on a 2-core machine)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_wds_rank, args=(r, 2, port, str(prepared_demo), outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    res = [json.load(open(o)) for o in outs]
    assert res[0]["shards"] < res[0]["consumers"]  # 1 training shard, 2 ranks x 2 workers
    assert res[0]["counts"] == res[1]["counts"] == [res[0]["expected"]] * 2 == [5, 5]
    # together the two ranks cover every sample of the epoch's 5 global batches exactly once
    assert sorted(res[0]["indices"] + res[1]["indices"]) == list(range(20))
    assert os.path.exists(outs[0])
