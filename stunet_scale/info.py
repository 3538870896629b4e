"""`stunet-scale info`: what the toolkit offers (presets, class maps) and what this machine has."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("torch", "deepspeed", "accelerate", "zarr", "numcodecs", "webdataset", "mlflow", "nibabel", "nnunetv2")


def _version(package: str) -> str | None:
    # importlib.metadata instead of importing: deepspeed probes accelerators at import time.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def report() -> dict:
    from .data.class_maps import CLASS_MAP_FILES, load_class_map
    from .models import PRESETS, ModelConfig, preset_table

    table = preset_table()
    presets = {}
    for size in PRESETS:
        cfg = ModelConfig(size=size).resolved()
        presets[size] = {
            "base_width": cfg.base_width,
            "blocks_per_stage": cfg.blocks_per_stage[0],
            "widths": cfg.widths,
            **table[size],
        }
    class_maps = {}
    for name in CLASS_MAP_FILES:
        cm = load_class_map(name)
        class_maps[name] = {
            "foreground_classes": cm.num_foreground,
            "outputs_with_background": cm.num_outputs,
            "totalseg_version": cm.totalseg_version,
            "description": cm.description,
        }
    return {"presets": presets, "class_maps": class_maps, "environment": environment()}


def format_report(info: dict) -> str:
    lines = ["STU-Net presets (1 input channel, 105 outputs, 128^3 patch, five stride-2 poolings)",
             f"  {'size':4} {'width':>5} {'blocks':>6} {'params':>15} {'fwd TFLOP/patch':>16}"]
    for size, p in info["presets"].items():
        lines.append(f"  {size:4} {p['base_width']:>5} {p['blocks_per_stage']:>6} {p['params']:>15,} "
                     f"{p['forward_flops_per_128cube_patch'] / 1e12:>16.3f}")
    lines.append("Class maps")
    for name, c in info["class_maps"].items():
        lines.append(f"  {name:12} {c['foreground_classes']:>3} classes ({c['outputs_with_background']} outputs)  {c['description']}")
    env = info["environment"]
    lines.append("Environment")
    lines.append(f"  python {env['python']} on {env['platform']}")
    lines.append("  " + ", ".join(f"{k} {v or '-'}" for k, v in env["packages"].items()))
    lines.append(f"  CUDA {env['cuda'] or '-'}, cuDNN {env['cudnn'] or '-'}, GPUs: {', '.join(env['gpus']) or 'none'}")
    return "\n".join(lines)
