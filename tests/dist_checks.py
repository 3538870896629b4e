"""Backend-level checks on 2 CPU ranks in one launch (``torchrun --nproc_per_node 2 tests/dist_checks.py OUT``).

Each check builds real backends (stunet_scale.parallel) around a tiny STU-Net and writes its numbers to
``OUT/rank{r}.json``; tests/test_train_distributed.py asserts on them. Checks:

* grads:      every parameter gets a non-zero gradient under ZeRO-3 + non-reentrant block checkpointing;
              the same model with *reentrant* checkpointing leaves the first block's gradient at zero
              (the failure the non-reentrant choice avoids: proves the check can fail).
* precision:  our DeepSpeed config keeps every parameter (InstanceNorm included) fp32 and the loss fp32
              under bf16; DeepSpeed's own "bf16" mode would have cast InstanceNorm weights to bf16.
* zero0_vs_3: the first-step loss of ZeRO stage 0 and stage 3 from the same init and data.
* discard:    a non-finite micro-batch after a good one (gradient accumulation 2) is discarded under
              ZeRO-3: the next step's grad norm and parameters equal a run that never saw either.
* offload:    ZeRO-3 with optimizer states and parameters offloaded to CPU takes a step with torch SGD.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_data

from stunet_scale.config import load_config
from stunet_scale.models import build_stunet
from stunet_scale.parallel.distributed import init_distributed
from stunet_scale.parallel.wrap import build_backend
from stunet_scale.train.loss import DiceCELoss

TINY = ["model.size=null", "model.base_width=4", "model.blocks_per_stage=1", "model.num_classes=4",
        "model.width_multipliers=[1,2,4,8]", "model.pool_strides=[[2,2,2],[2,2,2],[2,2,2]]",
        "model.kernel_sizes=[[3,3,3],[3,3,3],[3,3,3],[3,3,3]]", "data.patch_size=[16,16,16]",
        "loss.deep_supervision_weights=[0.5,0.3,0.2]", "distributed.backend=deepspeed",
        "schedule.global_batch=4", "schedule.micro_batch=2", "distributed.precision=fp32",
        "distributed.activation_checkpointing=block", "validation.enabled=false", "tracking.enabled=false"]


RUN_DIR = ["."]  # set by main(): DeepSpeed's backend writes deepspeed_config.json into run_dir


def cfg_with(*overrides):
    return load_config(None, [*TINY, f"run_dir={RUN_DIR[0]}", *overrides])


def batch(cfg, g0: int, n: int):
    imgs, labs = zip(*(synthetic_data.make_sample(0, g, cfg.data.patch_size, cfg.model.num_classes) for g in range(g0, g0 + n)))
    label = torch.from_numpy(__import__("numpy").stack(labs))[:, None]
    return torch.from_numpy(__import__("numpy").stack(imgs)), synthetic_data.targets_for(label, cfg.model.pool_strides)


def backend_for(cfg, env, gas=1, reentrant_first=False):
    torch.manual_seed(0)
    model = build_stunet(cfg.model)
    b = build_backend(model, cfg, env, gas)
    if reentrant_first:  # swap the first block's checkpoint for the legacy reentrant one
        first = b.module.conv_blocks_context[0][0]
        first.forward = types.MethodType(
            lambda self, x: checkpoint(type(self).forward, self, x, use_reentrant=True), first)
    return b


def full_grads(b) -> dict[str, float]:
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in b.module.named_parameters():
        g = safe_get_full_grad(p)  # collective
        out[name] = math.nan if g is None else float(g.float().norm())
    return out


def full_params(b) -> torch.Tensor:
    return torch.cat([p.flatten() for _, p, _ in b.iter_full_state({n for n, _ in b.module.named_parameters()})])


def main(out_dir: str) -> None:
    RUN_DIR[0] = str(Path(out_dir) / "run")  # never the default runs/debug of the user's checkout
    env = init_distributed(120, need_group=True)
    r = env.rank
    res: dict = {}
    loss_fn = DiceCELoss([0.5, 0.3, 0.2])

    # ---- grads under ZeRO-3 + activation checkpointing --------------------------------------
    cfg = cfg_with("distributed.zero_stage=3")
    x, y = batch(cfg, 2 * r, 2)
    for key, reentrant in (("grads", False), ("grads_reentrant", True)):
        b = backend_for(cfg, env, reentrant_first=reentrant)
        b.accumulate(True)
        loss, _ = loss_fn(b.forward(x), y)
        b.backward(loss)
        res[key] = full_grads(b)
        b.step()

    # ---- precision ---------------------------------------------------------------------------
    cfg = cfg_with("distributed.zero_stage=3", "distributed.precision=bf16")
    b = backend_for(cfg, env)
    out = b.forward(x)
    loss, _ = loss_fn(out, y)
    res["precision"] = {
        "ds_config_autocast": b.ds_config.get("torch_autocast"), "ds_config_bf16": b.ds_config.get("bf16"),
        "param_dtypes": sorted({str(p.dtype) for p in b.module.parameters()}),
        "norm_dtypes": sorted({str(m.weight.dtype) for m in b.module.modules() if isinstance(m, torch.nn.InstanceNorm3d)}),
        "output_dtype": str(out[0].dtype), "loss_dtype": str(loss.dtype),
    }
    import deepspeed

    torch.manual_seed(0)
    plain = build_stunet(cfg.model)
    ds_bf16 = dict(b.ds_config)
    ds_bf16.pop("torch_autocast")
    ds_bf16["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.01),
                                      config=ds_bf16, dist_init_required=False)
    res["precision"]["deepspeed_bf16_mode_norm_dtypes"] = sorted(
        {str(m.weight.dtype) for m in engine.module.modules() if isinstance(m, torch.nn.InstanceNorm3d)})

    # ---- ZeRO stage 0 vs 3: first-step loss ----------------------------------------------------
    res["zero0_vs_3"] = {}
    for stage in (0, 3):
        cfg = cfg_with(f"distributed.zero_stage={stage}")
        b = backend_for(cfg, env)
        b.accumulate(True)
        loss, _ = loss_fn(b.forward(x), y)
        total = env.all_reduce([loss.item()], "sum")[0] / env.world_size
        res["zero0_vs_3"][str(stage)] = total

    # ---- discard a half-accumulated step (ZeRO-3, gradient accumulation 2) ---------------------
    cfg = cfg_with("distributed.zero_stage=3", "schedule.micro_batch=1")
    xa, ya = batch(cfg, 100 + r, 1)
    xc, yc = batch(cfg, 200 + 2 * r, 1)
    xd, yd = batch(cfg, 201 + 2 * r, 1)
    runs = {}
    for name, aborted in (("with_abort", True), ("clean", False)):
        b = backend_for(cfg, env, gas=2)
        before = full_params(b)
        if aborted:
            b.accumulate(False)
            loss, _ = loss_fn(b.forward(xa), ya)
            b.backward(loss)  # micro-batch 1 of 2 accumulated ...
            b.accumulate(True)
            loss, _ = loss_fn(b.forward(xa), ya)  # ... micro-batch 2 is "non-finite": skip the step
            b.discard_grads()
            assert torch.equal(full_params(b), before), "discarding changed parameters"
        for i, (xi, yi) in enumerate(((xc, yc), (xd, yd))):
            b.accumulate(i == 1)
            loss, _ = loss_fn(b.forward(xi), yi)
            b.backward(loss)
        norm, _ = b.step()
        runs[name] = (norm, full_params(b))
    res["discard"] = {"norm_with_abort": runs["with_abort"][0], "norm_clean": runs["clean"][0],
                      "params_equal": bool(torch.equal(runs["with_abort"][1], runs["clean"][1]))}

    # ---- CPU offload of optimizer states and parameters (ZeRO-3) with our torch SGD ----------
    cfg = cfg_with("distributed.zero_stage=3", "distributed.offload_optimizer=true", "distributed.offload_params=true")
    b = backend_for(cfg, env)
    b.accumulate(True)
    loss, _ = loss_fn(b.forward(x), y)
    b.backward(loss)
    norm, reason = b.step()
    res["offload"] = {"grad_norm": norm, "reason": reason,
                      "offload": cfg.distributed.offload_optimizer and b.ds_config["zero_optimization"]["offload_param"]["device"]}

    Path(out_dir, f"rank{r}.json").write_text(json.dumps(res, indent=1))
    env.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1])
