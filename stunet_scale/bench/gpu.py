"""`stunet-scale bench gpu`: every GPU number of the project in one prepared run (issue 14).

A GPU machine is lent for ~15 minutes in all, start-up included, so one command must produce every
number and must not stop at the first problem. Each part runs in its own process (its own CUDA
context, its own peak memory, its own crash) under its own time cap; the caps split ``--budget-s``
in proportion to what each part is expected to cost, so the whole run fits the budget even when
every part runs into its cap. A part that fails or times out is recorded and the next one starts.

    cudnn_probe  the bf16 conv3d cuDNN probe the trainer runs at start (parallel/distributed.py)
    train_b      `bench train` for STU-Net-B, 128^3, batch 2: ours vs the released STU-Net step
    train_h      STU-Net-H, 128^3, batch 2, one GPU, the H recipe's backend (DeepSpeed ZeRO-3 +
                 block checkpointing) on random data
    planner      the planner's predicted peak memory next to the measured peaks (B, H from the
                 parts above; S and L measured here)
    augment      batched GPU augmentation ms per 2 x 128^3 micro-batch, and CPU <-> GPU parity
    predict      bf16 `stunet-scale predict` of a generated CT with an exported (untrained) STU-Net-S
    gpu_tests    `pytest -m gpu` over the test files that hold GPU tests

Output: ``OUT/gpu_check.json`` (environment + every part: status, seconds, numbers, goal, met) and
``OUT/gpu_check.md`` (a table). Every number is measured; what could not be measured is null with a
reason. ``--cpu-dry-run`` runs the same parts on the CPU with tiny models and patches so that the
plumbing (processes, caps, parsing, JSON, table) is exercised without a GPU; its numbers say
nothing about GPUs, so no goal is judged in a dry run (met = null).

Fault injection for the tests: ``STUNET_GPU_CHECK_FAULT=part:fail,part:hang`` makes that part's
process raise, or sleep past its cap.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
H_RECIPE = REPO / "configs" / "pretrain" / "totalseg_stunet_h.yaml"

PARTS = ("cudnn_probe", "train_b", "train_h", "planner", "augment", "predict", "gpu_tests")
# Relative share of the budget per part, from what each costs on one H100/H200: process start and
# torch import (~5-10 s each), cuDNN autotuning, and the work itself (train_b: two processes of
# 13 steps of B; train_h: building a 1.4B-parameter model and DeepSpeed set-up; gpu_tests: a pytest
# collection of five test modules).
WEIGHTS = {"cudnn_probe": 1.0, "train_b": 4.0, "train_h": 5.0, "planner": 2.5, "augment": 1.5,
           "predict": 2.0, "gpu_tests": 3.0}
DEFAULT_BUDGET_S = 480.0

# Dense bf16 peak TFLOP/s by device name; first match wins, so "H100 PCIe" precedes "H100".

GOALS = {
    "cudnn_probe": "bf16 conv3d runs on a known-good cuDNN",
    "train_b": "ours >= 1.3x the reference's patches/s",
    "train_h": "peak <= 45 GB and >= 35% of the GPU's dense bf16 peak",
    "planner": "predicted peak within 15% of measured, every measured size",
    "augment": "<= 15 ms per 2 x 128^3 batch, GPU output equals CPU output",
    "predict": "bf16 predict writes a label map of the input's shape",
    "gpu_tests": "no GPU test fails or errors",
}
FAULT_ENV = "STUNET_GPU_CHECK_FAULT"
CAP_ENV = "STUNET_GPU_CHECK_CAP_S"  # a part's own cap, for parts that stop their children in time
GB = 1e9
GIB = 2**30


def split_budget(parts, budget_s: float, weights: dict | None = None) -> dict[str, float]:
    """Per-part caps in seconds: ``budget_s`` split in proportion to each part's weight.

    The caps sum to the budget, so the run ends within it even if every part hits its cap.
    """
    weights = weights or WEIGHTS
    parts = list(parts)
    if budget_s <= 0 or not parts:
        raise ValueError("the budget must be positive and at least one part selected")
    total = sum(weights.get(p, 1.0) for p in parts)
    return {p: budget_s * weights.get(p, 1.0) / total for p in parts}


def parse_parts(text: str | None) -> list[str]:
    """``a,b`` -> the parts in canonical order (the planner reads what train_b/train_h measured)."""
    if not text:
        return list(PARTS)
    wanted = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown or not wanted:
        raise ValueError(f"unknown part(s) {unknown or text!r}; choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in wanted]


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 skipped, 2 deselected in 4.1s")."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0, "xfailed": 0, "xpassed": 0}
    lines = [ln for ln in text.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    if not lines:
        return counts
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", lines[-1]):
        counts["errors" if word.startswith("error") else word] += int(n)
    return counts


def _git_revision() -> str | None:
    """HEAD's commit read from .git's files (no git process; the GPU machine may have no .git)."""
    git = REPO / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        for root in (git, Path((git / "commondir").read_text().strip()) if (git / "commondir").exists() else None):
            if root is None:
                continue
            root = root if root.is_absolute() else git / root
            if (root / ref).exists():
                return (root / ref).read_text().strip()
            packed = root / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


# ------------------------------------------------------------------------------------------------
# the parent: runs each part in its own process group under its cap
# ------------------------------------------------------------------------------------------------


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _run_capped(cmd: list[str], cap_s: float, log_stem: Path, env: dict) -> tuple[str, float, int | None]:
    """Run ``cmd`` in a new session; kill its whole process group at the cap. -> (status, seconds, rc)."""
    t0 = time.perf_counter()
    with open(f"{log_stem}.stdout", "w") as out, open(f"{log_stem}.stderr", "w") as err:
        # A new session so that a timed-out part's own children (bench train spawns one process per
        # variant) die with it and release the GPU before the next part starts.
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc, status = None, "timeout"
    return status, time.perf_counter() - t0, rc


def _environment(out: Path, dry_run: bool, env: dict) -> dict:
    """torch / CUDA / cuDNN / device, read in a child so the parent never holds a CUDA context."""
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version() if c else None, "
            "'cuda_available': c, 'device_name': torch.cuda.get_device_name(0) if c else None, "
            "'device_count': torch.cuda.device_count()}))")
    info: dict = {"python": sys.version.split()[0], "dry_run": dry_run, "git_revision": _git_revision()}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        info.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except Exception as e:
        info["environment_error"] = f"{e.__class__.__name__}: {e}"
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    if info.get("git_revision") is None:
        info["git_revision_note"] = "no readable .git in the working tree"
    return info


def run_check(out: str | Path, parts: list[str], budget_s: float = DEFAULT_BUDGET_S, dry_run: bool = False) -> dict:
    out = Path(out).resolve()  # the parts run with the repo as their working directory
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "parts" / "measured.json").unlink(missing_ok=True)  # never compare with an earlier run's peaks
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    t_start = time.perf_counter()
    environment = _environment(out, dry_run, env)
    environment["seconds"] = round(time.perf_counter() - t_start, 2)
    # The environment probe comes out of the budget too, so the whole run fits it.
    caps = split_budget(parts, max(budget_s - environment["seconds"], 1.0))
    report = {"budget_s": budget_s, "caps_s": caps, "environment": environment, "dry_run": dry_run, "parts": {}}
    for name in parts:
        result_file = out / "parts" / f"{name}.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "stunet_scale.bench.gpu", name, str(out)] + (["--dry-run"] if dry_run else [])
        print(f"[bench gpu] {name}: cap {caps[name]:.0f} s", flush=True)
        status, seconds, rc = _run_capped(cmd, caps[name], out / "parts" / name, {**env, CAP_ENV: str(caps[name])})
        entry = {"status": status, "seconds": round(seconds, 2), "cap_s": round(caps[name], 1), "returncode": rc,
                 "goal": GOALS[name], "met": None, "numbers": {}}
        if result_file.exists():
            got = json.loads(result_file.read_text())
            entry.update({k: v for k, v in got.items() if k != "status"})
            if status == "ok" and got.get("status") == "skipped":
                entry["status"] = "skipped"
        elif status == "ok":  # exited 0 without a result: a bug, not a measurement
            entry["status"] = "failed"
            entry["reason"] = "the part exited 0 without writing its result"
        if status == "timeout":
            entry["reason"] = f"exceeded its cap of {caps[name]:.0f} s and was killed"
        if entry["status"] != "ok" or status != "ok":
            entry["stderr_tail"] = _tail(out / "parts" / f"{name}.stderr")
        if dry_run:
            entry["met"] = None
            entry["met_reason"] = "dry run: CPU numbers of tiny models say nothing about the GPU goal"
        report["parts"][name] = entry
        print(f"[bench gpu] {name}: {entry['status']} in {seconds:.1f} s", flush=True)
        if name in ("train_b", "train_h"):  # the planner compares its predictions with these peaks
            (out / "parts" / "measured.json").write_text(json.dumps(_measured(report["parts"]), indent=1))
    report["total_seconds"] = round(time.perf_counter() - t_start, 2)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(format_markdown(report))
    return report


def _measured(parts: dict) -> dict:
    """Measured peaks the planner compares against: {size: {bytes, setting}}."""
    got = {}
    b = parts.get("train_b", {}).get("numbers", {})
    if b.get("ours_peak_memory_bytes"):
        got["B"] = {"peak_memory_bytes": b["ours_peak_memory_bytes"], "zero": 0, "memory_kind": b.get("memory_kind"),
                    "model": b.get("model")}
    h = parts.get("train_h", {}).get("numbers", {})
    if h.get("peak_memory_bytes"):
        got["H"] = {"peak_memory_bytes": h["peak_memory_bytes"], "zero": h.get("zero_stage") or 0,
                    "memory_kind": h.get("memory_kind"), "model": h.get("model")}
    return got


def _fmt(v, digits=3):
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


HEADLINES = {  # the numbers the table shows per part (all are in the JSON)
    "cudnn_probe": ("cudnn_version", "report"),
    "train_b": ("speedup", "ours_seconds_per_step", "ours_tflops", "ours_peak_memory_gib", "reference_peak_memory_gib"),
    "train_h": ("seconds_per_step", "tflops", "mfu", "peak_memory_gb"),
    "planner": ("worst_relative_error",),
    "augment": ("ms_per_batch", "parity_max_abs_diff", "parity_label_mismatch"),
    "predict": ("predict_seconds", "output_written"),
    "gpu_tests": ("passed", "failed", "errors", "skipped", "incomplete"),
}


def format_markdown(report: dict) -> str:
    e = report["environment"]
    lines = [f"# bench gpu{' (CPU dry run: numbers say nothing about GPUs)' if report['dry_run'] else ''}", "",
             f"device: {e.get('device_name') or 'cpu'}; torch {e.get('torch')}, CUDA {e.get('cuda')}, "
             f"cuDNN {e.get('cudnn')}, driver {e.get('driver')}; git {e.get('git_revision')}; "
             f"{report['total_seconds']} s of a {report['budget_s']:.0f} s budget", "",
             "| part | status | s | number | goal | met |", "|---|---|---|---|---|---|"]
    for name, p in report["parts"].items():
        nums = p.get("numbers", {})
        shown = "; ".join(f"{k} {_fmt(nums.get(k))}" for k in HEADLINES[name] if k in nums) or p.get("reason", "")
        shown = shown.replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {p['status']} | {p['seconds']:.1f} | {shown} | {p['goal']} | {_fmt(p['met'])} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    """CLI entry: 0 if every part ran (goals may be missed), 1 if any failed/timed out, 2 usage."""
    try:
        parts = parse_parts(args.parts)
        if args.budget_s <= 0:
            raise ValueError("--budget-s must be positive")
    except ValueError as e:
        print(f"bench gpu: {e}", file=sys.stderr)
        return 2
    report = run_check(args.out, parts, args.budget_s, args.cpu_dry_run)
    print((Path(args.out) / "gpu_check.md").read_text())
    bad = [n for n, p in report["parts"].items() if p["status"] in ("failed", "timeout")]
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------
# the parts (each runs in its own process: python -m stunet_scale.bench.gpu PART OUT [--dry-run])
# ------------------------------------------------------------------------------------------------


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tiny_model_overrides() -> dict:
    # width 4, one block per stage, the presets' strides: a 64^3 patch keeps a 2x4x4 bottleneck
    return {"size": None, "base_width": 4, "blocks_per_stage": 1, "num_classes": 4}


def part_cudnn_probe(out: Path, dry: bool) -> dict:
    import torch

    from ..parallel.distributed import check_cudnn_conv3d

    dev = _device()
    nums = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": str(dev)}
    try:
        nums["report"] = check_cudnn_conv3d(dev)
        met = True if dev.type == "cuda" else None
    except RuntimeError as e:  # the probe's verdict is the measurement here, not a crash
        nums["report"], met = f"probe failed: {e}", False
    return {"numbers": nums, "met": met}


def part_train_b(out: Path, dry: bool) -> dict:
    from .train import bench_train

    if dry:
        res = bench_train(size="B", patch=64, batch=1, steps=1, warmup=1, device="cpu", num_classes=4,
                          base_width=4, threads=1)
    else:
        res = bench_train(size="B", patch=128, batch=2, steps=10, warmup=3, device="cuda")
    (out / "parts" / "train_b_raw.json").write_text(json.dumps(res, indent=1))
    o, r = res["ours"], res["reference"]
    nums = {"model": "STU-Net-B" if not dry else "tiny STU-Net (width 4)", "patch": res["patch"], "batch": res["batch"],
            "device": res["device"], "via": "stunet_scale.bench.train.bench_train (= stunet-scale bench train --json)",
            "reference_loss": r.get("loss"), "memory_kind": o.get("memory_kind")}
    for kind, m in (("ours", o), ("reference", r)):
        if "error" in m:
            nums[f"{kind}_error"] = m["error"]
            continue
        nums.update({f"{kind}_seconds_per_step": m["seconds_per_step"], f"{kind}_patches_per_s": m["patches_per_s"],
                     f"{kind}_tflops": m["tflops"], f"{kind}_mfu": m.get("mfu"),
                     f"{kind}_peak_memory_bytes": m["peak_memory_bytes"],
                     f"{kind}_peak_memory_gib": m["peak_memory_bytes"] / GIB})
    nums["speedup"] = res.get("speedup")
    if "error" in o:
        raise RuntimeError(f"our step failed: {o['error']}")
    return {"numbers": nums, "met": None if nums["speedup"] is None else nums["speedup"] >= 1.3}


def _random_targets(cfg_model, batch: int, patch, device):
    import torch

    from ..data.stream.patch_geometry import deep_supervision_strides

    strides = deep_supervision_strides(cfg_model.pool_strides, cfg_model.deep_supervision)
    return [torch.randint(0, cfg_model.num_classes, (batch, 1, *(p // s for p, s in zip(patch, st))), device=device)
            for st in strides]


def part_train_h(out: Path, dry: bool) -> dict:
    """The H recipe's backend on random data: DeepSpeed ZeRO-3 + block checkpointing, bf16, one GPU.

    The trainer's own pieces (load_config of the recipe, init_distributed, build_backend,
    DiceCELoss.from_config) without its data loader, whose speed `bench data` / `augment` measure.
    Without DeepSpeed it measures our plain step (bench train's "ours", same checkpointing and
    precision; on one GPU ZeRO-3 shards nothing) and says so.
    """
    import torch

    if dry:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(1)
    patch = [64] * 3 if dry else [128] * 3
    run_dir = out / "parts" / "train_h_run"
    overrides = [f"run_dir={run_dir}", "tracking.enabled=false", f"data.patch_size={patch}",
                 "schedule.global_batch=2", "schedule.micro_batch=2"]
    # On the CPU, DeepSpeed's process group JIT-compiles its shared-memory comm op (45-100 s on two
    # cores, again in every process here), which alone would blow the dry run's 3 minutes. So the
    # dry run skips the ZeRO-3 path (saying so) and runs this same harness on the trainer's plain
    # backend; STUNET_GPU_CHECK_DS_CPU=1 runs ZeRO-3 on the CPU anyway.
    use_ds = not dry or os.environ.get("STUNET_GPU_CHECK_DS_CPU") == "1"
    skipped_zero3 = None
    if dry:
        overrides += [f"model.{k}={json.dumps(v)}" for k, v in _tiny_model_overrides().items()]
        if not use_ds:
            overrides.append("distributed.backend=none")
            skipped_zero3 = ("dry run: DeepSpeed ZeRO-3 skipped, its CPU comm op is JIT-compiled per process (45-100 s "
                             "on 2 cores); measured with distributed.backend=none, same harness, checkpointing and "
                             "precision (STUNET_GPU_CHECK_DS_CPU=1 runs ZeRO-3)")
    ds_error = None
    if use_ds:
        try:
            import deepspeed  # noqa: F401
        except Exception as e:
            ds_error = f"{e.__class__.__name__}: {e}"
    if ds_error is not None:
        if dry:
            return {"status": "skipped", "reason": f"deepspeed not importable ({ds_error})", "numbers": {}, "met": None}
        from .train import _measure

        m = _measure("ours", dict(size="H", patch=128, batch=2, steps=3, warmup=2, device="cuda", num_classes=105,
                                  base_width=None, checkpointing="block", compile=False, threads=None))
        nums = {"path": f"bench train's 'ours' step, no DeepSpeed ({ds_error})", "model": "STU-Net-H", "zero_stage": 0,
                "seconds_per_step": m["seconds_per_step"], "tflops": m["tflops"],
                "peak_memory_bytes": m["peak_memory_bytes"], "memory_kind": m["memory_kind"]}
        return _h_goal(nums)

    from ..config import load_config
    from ..models import build_stunet, train_step_flops
    from ..parallel.distributed import init_distributed, shutdown
    from ..parallel.wrap import build_backend
    from ..tracking import peak_rss_bytes
    from ..train.loss import DiceCELoss

    cfg = load_config(H_RECIPE, overrides)
    env = init_distributed(cfg.distributed.timeout_s, str(run_dir), need_group=True)
    if env.device.type == "cuda":  # as the trainer's _configure_torch: fixed patch, autotune once
        torch.backends.cudnn.benchmark = not cfg.distributed.deterministic
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        # Built on the device: H's 1.4B parameters initialise in milliseconds there, in tens of
        # seconds on the CPU, time this part's cap is better spent on steps. DeepSpeed takes either.
        with env.device:
            model = build_stunet(cfg.model)
        backend = build_backend(model, cfg, env, grad_accumulation=1)
        setup_s = time.perf_counter() - t0
        loss_fn = DiceCELoss.from_config(cfg.loss)
        b = cfg.schedule.micro_batch
        x = torch.randn(b, cfg.model.in_channels, *patch)
        targets = _random_targets(cfg.model, b, patch, env.device)

        def step():
            with backend.accumulate(last=True):
                outputs = backend.forward(x)
                loss, _ = loss_fn(outputs, targets)
                backend.backward(loss)
            backend.step()
            return loss

        def sync():
            if env.device.type == "cuda":
                torch.cuda.synchronize()

        warmup, steps = (1, 1) if dry else (2, 5)
        for _ in range(warmup):
            step()
        sync()
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        dt = (time.perf_counter() - t0) / steps
        flops = train_step_flops(cfg.model, tuple(patch), b)
        nums = {"path": skipped_zero3 or "the trainer's DeepSpeed backend (build_backend), H recipe, random data",
                "backend": cfg.distributed.backend,
                "model": "STU-Net-H" if not dry else "tiny STU-Net (width 4)", "patch": patch, "batch": b,
                "zero_stage": cfg.distributed.zero_stage if cfg.distributed.backend == "deepspeed" else None,
                "checkpointing": cfg.distributed.activation_checkpointing,
                "precision": cfg.distributed.precision, "device": str(env.device), "setup_seconds": setup_s,
                "steps": steps, "warmup": warmup, "seconds_per_step": dt, "patches_per_s": b / dt,
                "tflops": flops / dt / 1e12, "final_loss": float(loss.detach())}
        if env.device.type == "cuda":
            nums.update(peak_memory_bytes=torch.cuda.max_memory_allocated(),
                        peak_memory_reserved_bytes=torch.cuda.max_memory_reserved(),
                        memory_kind="cuda max_memory_allocated")
        else:
            nums.update(peak_memory_bytes=peak_rss_bytes(), memory_kind="peak RSS of the process (CPU)")
        return _h_goal(nums)
    finally:
        shutdown(env)


def _h_goal(nums: dict) -> dict:
    import torch

    from .train import peak_bf16_tflops

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = peak_bf16_tflops(name)
    nums["peak_memory_gb"] = nums["peak_memory_bytes"] / GB
    nums["device_peak_bf16_tflops"] = peak
    nums["mfu"] = nums["tflops"] / peak if peak else None
    mem_ok = nums["peak_memory_gb"] <= 45
    if peak is None:
        nums["mfu_goal"] = "unknown" if name else "no GPU"
        met = None
    else:
        met = mem_ok and nums["mfu"] >= 0.35
    nums["memory_goal_met"] = mem_ok
    return {"numbers": nums, "met": met}


def part_planner(out: Path, dry: bool) -> dict:
    import torch

    from ..models import ModelConfig
    from ..planning import Setting, Workload, estimate

    measured = {}
    mfile = out / "parts" / "measured.json"
    if mfile.exists():
        measured = json.loads(mfile.read_text())
    dev = _device()
    mem_gb = torch.cuda.get_device_properties(0).total_memory / GB if dev.type == "cuda" else 80.0
    patch = 64 if dry else 128
    rows = {}
    sizes = ["S", "B", "L", "H"]
    for size in sizes:
        zero = measured.get(size, {}).get("zero", 3 if size == "H" else 0)
        model = ModelConfig(**_tiny_model_overrides()).resolved() if dry else size
        est = estimate(Workload(model=model, patch=(patch,) * 3, micro_batch=2, gpus=1, gpu_mem_gb=mem_gb),
                       Setting(zero=int(zero), checkpointing="block", offload="none"))
        rows[size] = {"predicted_gib": est["memory_gib"]["total"], "setting": est["label"],
                      "model": "tiny STU-Net (width 4)" if dry else f"STU-Net-{size}"}
        if dry:
            rows[size]["note"] = "dry run: every size is the same tiny model"
    # S and L: one forward+backward of our step (bench train's "ours") here, cheap on a GPU; on the
    # CPU the peak would be the process RSS, not comparable with the planner's device bytes.
    if dev.type == "cuda":
        from .train import _measure

        for size in ("S", "L"):
            try:
                m = _measure("ours", dict(size=size, patch=128, batch=2, steps=1, warmup=1, device="cuda",
                                          num_classes=105, base_width=None, checkpointing="block", compile=False,
                                          threads=None))
                measured[size] = {"peak_memory_bytes": m["peak_memory_bytes"], "zero": 0,
                                  "memory_kind": m["memory_kind"]}
            except Exception as e:
                rows[size]["measure_error"] = f"{e.__class__.__name__}: {e}"
            torch.cuda.empty_cache()
    errors = []
    for size, row in rows.items():
        m = measured.get(size)
        if not m:
            row.update(measured_gib=None, relative_error=None, within_15pct=None,
                       reason=row.get("measure_error") or "not measured in this run")
            continue
        row["measured_gib"] = m["peak_memory_bytes"] / GIB
        row["memory_kind"] = m.get("memory_kind")
        if "RSS" in str(m.get("memory_kind")):
            row.update(relative_error=None, within_15pct=None,
                       reason="measured on the CPU as process RSS (includes the Python/torch baseline): not comparable")
            continue
        err = (row["predicted_gib"] - row["measured_gib"]) / row["measured_gib"]
        row.update(relative_error=err, within_15pct=abs(err) <= 0.15)
        errors.append(err)
    nums = {"patch": patch, "micro_batch": 2, "gpu_mem_gb": mem_gb, "sizes": rows,
            "worst_relative_error": max(errors, key=abs) if errors else None}
    return {"numbers": nums, "met": all(abs(e) <= 0.15 for e in errors) if errors else None}


def _rich_params(n_channels: int = 1):
    """The parity test's three samples: rotation+scale+blur+gamma; intensity-only; scale+noise."""
    import numpy as np

    from ..data.stream.plan import identity_params

    def params(**kw):
        p = identity_params(n_channels)
        for k, v in kw.items():
            p[k] = np.asarray(v, dtype=p[k].dtype)
        p["spatial"] = np.array("rotation" in kw or "scale" in kw)
        return p

    return [params(rotation=[0.3, -0.2, 0.5], scale=1.2, mirror=[True, False, False], blur_sigma=[[0.6, 0.9, 0.7]],
                   gamma=[1.2]),
            params(mirror=[False, True, True], brightness=[1.1], contrast=[0.9], lowres=[0.7], gamma_inverted=[0.8]),
            params(scale=0.8, noise_std=0.05, gamma=[0.8])]


def part_augment(out: Path, dry: bool) -> dict:
    import numpy as np
    import torch

    from ..config import load_config
    from ..data.stream import patch_geometry, raw_batch, transforms
    from ..data.stream import plan as sample_plan

    if dry:
        torch.set_num_threads(1)
    dev = _device()
    cfg = load_config(H_RECIPE, ["tracking.enabled=false"])
    p = 64 if dry else 128
    patch = [p] * 3
    initial = patch_geometry.initial_patch_size(patch, cfg.augmentation.rotation_max_deg)
    ds = patch_geometry.deep_supervision_strides(cfg.model.pool_strides, True)
    rng = np.random.default_rng(0)
    # A smooth HU-like image and blocky labels, so interpolation and nearest labels see real structure.
    coarse = rng.integers(-1000, 1000, (1, *(s // 8 + 1 for s in initial))).astype(np.float32)
    img = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=initial, mode="trilinear")[0]
    img = (img + torch.from_numpy(rng.normal(0, 30, img.shape).astype(np.float32))).to(torch.int16).numpy()
    blocks = rng.integers(0, 20, tuple(s // 9 + 1 for s in initial))
    lab = np.kron(blocks, np.ones((9, 9, 9)))[:initial[0], :initial[1], :initial[2]].astype(np.uint8)
    norm = np.array([[-np.inf, np.inf, 1 / 300, 0.0]], np.float32)

    def pinned(r):
        if dev.type != "cuda":
            return r
        return {k: (v.pin_memory() if isinstance(v, torch.Tensor) else
                    [t.pin_memory() for t in v] if isinstance(v, list) else v) for k, v in r.items()}

    # Timing: micro-batches of 2 with the recipe's parameter draws (its mix of rotated/scaled and
    # plain samples, noise by key), host-to-device copy from pinned memory included.
    n_batches = 4 if dry else 24
    batches = []
    for _ in range(n_batches + 2):
        params = [sample_plan.draw_params(rng, cfg.augmentation, 1) for _ in range(2)]
        keys = [int(rng.integers(1, 2**31)) if float(q["noise_std"]) > 0 else None for q in params]
        batches.append(pinned(raw_batch.raw_from_initial_patches([img, img], [lab, lab], params, [norm, norm], patch, initial,
                                                         keys)))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for b in batches[:2]:
        transforms.augment_batch(b, patch=patch, initial=initial, ds_strides=ds, device=dev)
    sync()
    times, spatial = [], []
    for b in batches[2:]:
        t0 = time.perf_counter()
        transforms.augment_batch(b, patch=patch, initial=initial, ds_strides=ds, device=dev)
        sync()
        times.append(time.perf_counter() - t0)
        sp = b["spatial_image"]
        spatial.append(len(sp) if isinstance(sp, list) else int(sp.shape[0]))
    ms = 1000 * float(np.mean(times))

    # Parity: the same raw batch and parameters on the CPU and on the device.
    params = _rich_params()
    raw = raw_batch.raw_from_initial_patches([img] * 3, [lab] * 3, params, [norm] * 3, patch, initial, [None, None, 1234567])
    x_cpu, t_cpu = transforms.augment_batch(raw, patch=patch, initial=initial, ds_strides=ds, device="cpu")
    if dev.type == "cuda":
        x_dev, t_dev = transforms.augment_batch(raw, patch=patch, initial=initial, ds_strides=ds, device=dev)
        parity_of = "cpu vs cuda"
    else:  # no GPU: the CPU's two spatial paths (the GPU's batched one and the worker's per-sample one)
        x_dev, t_dev = transforms.augment_batch(raw, patch=patch, initial=initial, ds_strides=ds, device="cpu",
                                       batched_spatial=True)
        parity_of = "cpu per-sample vs cpu batched spatial path (no GPU)"
    x_dev = x_dev.cpu()
    diff = (x_dev - x_cpu).abs()
    tol = 1e-3 + 1e-3 * x_cpu.abs()
    mismatch = max(float((a != b.cpu()).float().mean()) for a, b in zip(t_cpu, t_dev))
    parity_ok = bool((diff <= tol).all()) and mismatch < 1e-3
    nums = {"device": str(dev), "patch": patch, "initial_patch": list(initial), "batch": 2, "batches_timed": len(times),
            "ms_per_batch": ms, "ms_per_batch_max": 1000 * max(times),
            "spatial_samples_per_batch_mean": float(np.mean(spatial)),
            "parity_of": parity_of, "parity_max_abs_diff": float(diff.max()),
            "parity_mean_abs_diff": float(diff.mean()),
            "parity_label_mismatch": mismatch, "parity_ok": parity_ok}
    return {"numbers": nums, "met": (ms <= 15 and parity_ok) if dev.type == "cuda" else None}


def part_predict(out: Path, dry: bool) -> dict:
    import dataclasses

    import nibabel as nib
    import torch

    from ..config import TrainConfig, to_dict
    from ..export.exporter import export
    from ..export.spec import spec_from_train_config
    from ..models import ModelConfig, STUNet

    work = out / "parts" / "predict"
    raw = work / "raw"
    env = dict(os.environ)
    if not raw.exists():
        subprocess.run([sys.executable, "-m", "stunet_scale", "demo-data", str(raw), "--cases", "1", "--seed", "0"],
                       check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    ct = next(raw.rglob("ct.nii.gz"))
    # An export of an untrained network: predict's cost does not depend on the weights' values,
    # and the export goes through the same writer and reader as a trained run's.
    labels = ["background", "liver", "spleen", "kidney_left"]
    model = ModelConfig(**_tiny_model_overrides()) if dry else ModelConfig(size="S", num_classes=len(labels))
    if dry:
        model = dataclasses.replace(model, pool_strides=[[2, 2, 2]] * 4 + [[1, 1, 1]])
    cfg = to_dict(TrainConfig())
    cfg["model"] = dataclasses.asdict(model.resolved())
    patch = [32] * 3 if dry else [128] * 3
    cfg["data"].update(patch_size=patch, spacing=[1.5, 1.5, 1.5], root="/nonexistent/store")
    spec = spec_from_train_config(cfg, training={"steps": 0, "note": "untrained weights (bench gpu)"},
                                  manifest={"class_map": {"name": "custom", "labels": labels}})
    torch.manual_seed(0)
    net = STUNet(spec.model_config)
    source = work / "weights.pth"
    torch.save({"network_weights": net.state_dict(), "stunet_scale_spec": spec.to_dict()}, source)
    exported = work / "export"
    export(source, exported, formats=["safetensors"], overwrite=True, log=lambda *a: None)
    pred = work / "pred.nii.gz"
    pred.unlink(missing_ok=True)
    device = "cpu" if dry else "cuda"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "stunet_scale", "predict", str(exported), str(ct), str(pred),
                        "--precision", "bf16", "--device", device], env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    written = pred.exists()
    nums = {"model": "tiny STU-Net (width 4)" if dry else "STU-Net-S (untrained)", "device": device,
            "precision": "bf16", "input_shape": list(nib.load(ct).shape), "predict_seconds": seconds,
            "predict_returncode": r.returncode, "output_written": written,
            "note": "wall time of the `stunet-scale predict` process, start-up and model load included"}
    if written:
        nums["output_shape"] = list(nib.load(pred).shape)
    if r.returncode != 0:
        raise RuntimeError(f"predict exited {r.returncode}: {r.stderr[-2000:]}")
    return {"numbers": nums, "met": written and nums["output_shape"] == nums["input_shape"]}


def part_gpu_tests(out: Path, dry: bool) -> dict:
    # Only the files that hold GPU tests: collecting all of tests/ would import packages (mlflow,
    # nnunetv2) that the GPU image lacks and that no GPU test needs.
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in f.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    log = out / "parts" / "gpu_tests_pytest.log"
    # Stop pytest a little before this part's cap, so that what it finished is still counted.
    cap = float(os.environ.get(CAP_ENV, "0")) or None
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(cap - 8, 5) if cap else None)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    text = log.read_text(errors="replace")
    nums = {"files": files, "pytest_returncode": rc, "seconds": time.perf_counter() - t0}
    if rc is None:  # cut short: count the progress characters of the tests that did finish
        progress = [ln.strip() for ln in text.splitlines() if re.fullmatch(r"[.FEsxX]+( +\[ *\d+%\])?", ln.strip())]
        done = "".join(ln.split(" [")[0] for ln in progress)
        nums.update(passed=done.count("."), failed=done.count("F"), errors=done.count("E"), skipped=done.count("s"),
                    incomplete="pytest stopped at this part's cap; counts are of the tests finished by then")
        return {"numbers": nums, "met": False}
    nums.update(parse_pytest_summary(text))
    if rc not in (0, 1, 5):  # 1 = tests failed (a result); 5 = none collected; others = pytest broke
        raise RuntimeError(f"pytest exited {rc}: {text[-2000:]}")
    met = None if dry or nums["passed"] == 0 else nums["failed"] == 0 and nums["errors"] == 0
    return {"numbers": nums, "met": met}


PART_FUNCS = {"cudnn_probe": part_cudnn_probe, "train_b": part_train_b, "train_h": part_train_h,
              "planner": part_planner, "augment": part_augment, "predict": part_predict, "gpu_tests": part_gpu_tests}


def _inject_fault(name: str) -> None:
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        part, _, kind = item.partition(":")
        if part.strip() != name:
            continue
        if kind.strip() == "fail":
            raise RuntimeError(f"injected fault ({FAULT_ENV})")
        if kind.strip() == "hang":
            time.sleep(10**6)


def part_main(argv: list[str]) -> int:
    """Child process: run one part and write OUT/parts/PART.json."""
    name, out = argv[0], Path(argv[1])
    dry = "--dry-run" in argv[2:]
    _inject_fault(name)
    result = PART_FUNCS[name](out, dry)
    result.setdefault("status", "ok")
    (out / "parts" / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(part_main(sys.argv[1:]))
