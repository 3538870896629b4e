"""`stunet-scale bench train`: our training step against the released STU-Net step, in one run.

    ours       bf16 autocast (parameters, norms and loss fp32), activation checkpointing per block,
               channels-first, eager (``--compile`` to add torch.compile per block)
    reference  what the released STU-Net code does (nnU-Net v1 trainer): fp16 autocast + GradScaler,
               no activation checkpointing, channels-first, eager

Both run the same STU-Net preset, SGD (Nesterov 0.99), grad-norm clipping at 12 and Dice + CE with deep
supervision on random data (the data path is benchmarked by ``bench data``). The reference uses nnU-Net
v2's ``DC_and_CE_loss`` when nnunetv2 is installed, else ours (the same math).

Each variant runs in its own spawned process so its peak memory is its own: on CUDA the peak of
``torch.cuda.max_memory_allocated``, on CPU the process's peak resident set size (which includes
the Python/torch baseline, ~0.3 GB). Numbers are measured, never estimated; CPU numbers say nothing
about GPU performance.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time

# Dense bf16 peak of common GPUs (for MFU); unknown devices report no MFU.
# Dense bf16 peak by device-name substring, first match wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0, "L40S": 362.0,
                    "A10": 125.0}


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU by its torch device name; None when unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None) if device_name else None


def _model_cfg(size: str, num_classes: int, base_width: int | None):
    from ..models import ModelConfig

    if base_width:
        return ModelConfig(size=None, base_width=base_width, blocks_per_stage=1, num_classes=num_classes).resolved()
    return ModelConfig(size=size, num_classes=num_classes).resolved()


def _variant(kind: str, opts: dict, queue) -> None:
    try:
        queue.put(_measure(kind, opts))
    except Exception as e:
        queue.put({"error": f"{e.__class__.__name__}: {e}"})


def _measure(kind: str, opts: dict) -> dict:
    import torch

    from ..models import build_stunet, train_step_flops
    from ..parallel.activation_checkpointing import apply_activation_checkpointing
    from ..tracking import peak_rss_bytes
    from ..train.loss import DiceCELoss

    device = torch.device(opts["device"])
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    cfg = _model_cfg(opts["size"], opts["num_classes"], opts["base_width"])
    torch.manual_seed(0)
    model = build_stunet(cfg).to(device)
    weights = [1 / 2**i for i in range(len(cfg.pool_strides))]
    weights[-1] = 0.0
    weights = [w / sum(weights) for w in weights]
    ours = kind == "ours"
    loss_name = "stunet_scale DiceCELoss (fp32)"
    if ours:
        apply_activation_checkpointing(model, opts["checkpointing"])
        if opts["compile"]:
            for block in model.checkpoint_units("block"):
                block.compile()
        amp_dtype, scaler = torch.bfloat16, None
        loss_fn = DiceCELoss(weights)
    else:
        amp_dtype = torch.float16
        scaler = torch.amp.GradScaler(device.type)
        loss_fn = DiceCELoss(weights)
        try:
            from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
            from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
            from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

            nn_loss = DeepSupervisionWrapper(
                DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                               weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss),
                weights)
            loss_fn = lambda out, tgt: (nn_loss(list(out), tgt), None)  # noqa: E731
            loss_name = "nnunetv2 DC_and_CE_loss + DeepSupervisionWrapper"
        except ImportError:
            pass
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    b, p, c = opts["batch"], opts["patch"], cfg.num_classes
    x = torch.randn(b, cfg.in_channels, p, p, p, device=device)
    targets, scale = [], 1
    for i in range(len(cfg.pool_strides)):
        s = p // scale
        targets.append(torch.randint(0, c, (b, 1, s, s, s), device=device))
        scale *= cfg.pool_strides[i][0]

    def step():
        with torch.autocast(device.type, dtype=amp_dtype):
            out = model(x)
            if not ours:  # nnU-Net computes its loss inside the autocast region (softmax/CE autocast to fp32)
                loss, _ = loss_fn(out, targets)
        if ours:  # ours: outside autocast, on logits upcast to fp32
            loss, _ = loss_fn(out, targets)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
            opt.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(opts["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(opts["steps"]):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / opts["steps"]
    flops = train_step_flops(cfg, (p, p, p), b)
    result = {
        "precision": "bf16 autocast" if ours else "fp16 autocast + GradScaler",
        "checkpointing": opts["checkpointing"] if ours else "none",
        "compile": bool(ours and opts["compile"]),
        "loss": loss_name,
        "seconds_per_step": dt,
        "patches_per_s": b / dt,
        "tflops": flops / dt / 1e12,
        "final_loss": float(loss.detach()),
    }
    if device.type == "cuda":
        result.update(peak_memory_bytes=torch.cuda.max_memory_allocated(), memory_kind="cuda max_memory_allocated")
        name = torch.cuda.get_device_name(device)
        peak = peak_bf16_tflops(name)
        result["mfu"] = result["tflops"] / peak if peak else None
    else:
        result.update(peak_memory_bytes=peak_rss_bytes(),
                      memory_kind="peak RSS of the process (CPU)")
    return result


def bench_train(size: str = "B", patch: int = 128, batch: int = 2, steps: int = 10, warmup: int = 3,
                device: str | None = None, num_classes: int = 105, base_width: int | None = None,
                checkpointing: str = "block", compile: bool = False, threads: int | None = None) -> dict:
    """Measure both variants (each in a fresh process) and return one dict of measured numbers."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = dict(size=size, patch=patch, batch=batch, steps=steps, warmup=warmup, device=device, num_classes=num_classes,
                base_width=base_width, checkpointing=checkpointing, compile=compile, threads=threads)
    ctx = mp.get_context("spawn")
    out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "size": None if base_width else size, "base_width": base_width,
           "patch": patch, "batch": batch, "steps": steps, "warmup": warmup, "num_classes": num_classes}
    for kind in ("ours", "reference"):
        q = ctx.Queue()
        proc = ctx.Process(target=_variant, args=(kind, opts, q))
        proc.start()
        proc.join()
        out[kind] = q.get() if not q.empty() else {"error": f"process exited with {proc.exitcode} (out of memory?)"}
    o, r = out["ours"], out["reference"]
    if "error" not in o and "error" not in r:
        out["speedup"] = o["patches_per_s"] / r["patches_per_s"]
        out["memory_ratio"] = o["peak_memory_bytes"] / r["peak_memory_bytes"]
    return out


def format_report(res: dict) -> str:
    def row(name, m):
        if "error" in m:
            return f"  {name:<10} failed: {m['error']}"
        mem = m["peak_memory_bytes"] / 2**30
        mfu = f", MFU {100 * m['mfu']:.1f}%" if m.get("mfu") else ""
        return (f"  {name:<10} {m['patches_per_s']:8.3f} patches/s  {m['tflops']:8.3f} TFLOP/s{mfu}  "
                f"peak {mem:6.2f} GiB ({m['memory_kind']})  [{m['precision']}, checkpointing {m['checkpointing']}]")

    model = f"STU-Net-{res['size']}" if res["size"] else f"tiny STU-Net (base width {res['base_width']})"
    lines = [f"bench train: {model}, batch {res['batch']} x {res['patch']}^3, {res['num_classes']} classes, "
             f"{res['steps']} timed steps after {res['warmup']} warm-up, on {res['device']}",
             row("ours", res["ours"]), row("reference", res["reference"])]
    if "speedup" in res:
        lines.append(f"  ours / reference: {res['speedup']:.2f}x patches/s, {res['memory_ratio']:.2f}x peak memory")
    return "\n".join(lines)


def run(args) -> int:
    res = bench_train(size=args.size, patch=args.patch, batch=args.batch, steps=args.steps, warmup=args.warmup,
                      device=args.device, num_classes=args.num_classes, base_width=args.base_width,
                      checkpointing=args.checkpointing, compile=args.compile, threads=args.threads)
    print(json.dumps(res, indent=2) if args.json else format_report(res))
    failed = [k for k in ("ours", "reference") if "error" in res[k]]
    return 1 if failed == ["ours"] or len(failed) == 2 else 0


__all__ = ["bench_train", "format_report", "run"]
