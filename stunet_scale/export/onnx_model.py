"""ONNX export of the segmentation network and an onnxruntime stand-in for it in ``predict``.

    stunet-scale export runs/b exports/b --formats onnx safetensors
    stunet-scale predict exports/b ct.nii.gz seg.nii.gz --backend onnxruntime

What the file holds: the network alone, as the sliding window calls it. Input ``image``
``[batch, in_channels, *patch_size]`` float32, one normalised patch per batch entry (the spec's
normalisation and axis order: ``ModelSpec.axis_order``); output ``logits``
``[batch, num_classes, *patch_size]`` float32 from the full-resolution head only (the coarser
deep-supervision heads are not in the graph). The batch axis is dynamic; the spatial axes are the
training patch (sliding-window inference never feeds anything else). Resampling, normalisation,
the sliding window, mirroring, resampling back and arg-max stay in Python
(``stunet_scale.predict`` / ``stunet_scale.inference``) and are the same code for both backends.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer) at opset 17. The
torch.export-based exporter (the default since torch 2.9) needs the extra ``onnxscript`` package;
STU-Net's graph is static (convolutions, instance norm, leaky ReLU, nearest up-sampling, concat),
so tracing captures it completely and the result is checked numerically here anyway. Opset 17 is
read by onnxruntime >= 1.13 and TensorRT >= 8.6; every op in the graph (Conv, InstanceNormalization,
LeakyRelu, Resize nearest, Concat, Add) exists there unchanged.

Tolerance of the export check (``PARITY_RTOL``): onnxruntime's CPU convolutions sum in another order
than PyTorch's, so fp32 results differ by rounding only; through ~20 convolutions and instance norms
that is about 1e-5 of the logits' range on the models measured. The check allows
``max|ort - torch| <= 1e-3 * max(1, max|torch|)``: 100x the rounding noise, and 1000x below a change
that would move an arg-max on well-separated logits. A wrong weight, a missing bias or a swapped
axis moves the logits by O(1) of their range and fails it.

The spec (spacing, normalisation, labels, axis order) travels inside the file as metadata
``stunet_scale_spec`` (JSON), so ``predict --backend onnxruntime`` needs only the ``.onnx``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .checkpoint_io import CheckpointError
from .spec import ModelSpec

ONNX_OPSET = 17
ONNX_RELPATH = Path("onnx") / "model.onnx"  # inside an export folder
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SPEC_METADATA_KEY = "stunet_scale_spec"
PARITY_RTOL = 1e-3
INSTALL_HINT = "pip install 'stunet-scale[onnx]'  (or: pip install onnx onnxruntime)"


class OnnxUnavailableError(CheckpointError):
    """onnx or onnxruntime is not installed; the message says what to install."""


def require(module: str):
    """Import ``onnx`` or ``onnxruntime`` on first use: both are optional dependencies (the ``onnx`` extra)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OnnxUnavailableError(f"the ONNX format needs the Python package {module!r}, which is not installed "
                                   f"({e}); run: {INSTALL_HINT}") from None


def _network(state_dict: dict, spec: ModelSpec) -> torch.nn.Module:
    """The fp32 CPU network without deep supervision: the graph holds the full-resolution head only."""
    from ..models.stunet import STUNet

    model = STUNet(dataclasses.replace(spec.model_config, deep_supervision=False))
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


def export_onnx(state_dict: dict, spec: ModelSpec, path: str | Path, *, verify: bool = True, log=print) -> dict:
    """Write ``path`` (mode 0644) and, with ``verify``, check it against PyTorch; returns the check's numbers."""
    require("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _network(state_dict, spec)
    # Batch 2 while tracing so no size-1 batch axis can be folded into a constant.
    example = torch.zeros((2, spec.in_channels, *spec.patch_size))
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and tracer notes about instance norm's
        # shape checks (constant for a fixed patch) say nothing about this graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    _add_metadata(path, spec)
    os.chmod(path, 0o644)  # a deployment artefact others read; never the 0600 of a private temp file
    report = {"opset": ONNX_OPSET}
    if verify:
        report.update(verify_onnx(model, path, spec))
        log(f"  verified {path.name}: onnxruntime CPU vs PyTorch, max |diff| {report['max_abs_diff']:.2e} "
            f"(allowed {report['allowed_abs_diff']:.2e}), batch sizes {report['batch_sizes']}")
    return report


def _add_metadata(path: Path, spec: ModelSpec) -> None:
    onnx = require("onnx")
    # Weights of models over 2 GB sit in external data files beside the graph; they are not read
    # (or rewritten) here, only the graph's metadata changes.
    proto = onnx.load(str(path), load_external_data=False)
    entry = proto.metadata_props.add()
    entry.key, entry.value = SPEC_METADATA_KEY, json.dumps(spec.to_dict())
    proto.producer_name = "stunet-scale"
    onnx.save(proto, str(path))


def real_geometry_patch(spec: ModelSpec, seed: int = 0) -> np.ndarray:
    """One normalised patch ``[in_channels, *patch_size]`` of a CT phantom, through predict's own
    preprocessing (``model_input.preprocess``) at the model's spacing: the value range and flat regions a real scan gives the
    network (instance norm over organs and air), unlike Gaussian noise."""
    from ..data.ingest.demo import phantom
    from .model_input import preprocess

    zyx = spec.axis_order == "ras_zyx"
    spacing_ras = list(spec.spacing)[::-1] if zyx else list(spec.spacing)
    patch_ras = list(spec.patch_size)[::-1] if zyx else list(spec.patch_size)
    shape = [int(np.ceil(p * 1.25)) for p in patch_ras]  # a margin, so the crop to the body still covers a patch
    ct, _ = phantom(np.random.default_rng(seed), shape, spacing_ras, "v2")
    image = np.repeat(ct[None].astype(np.float32), spec.in_channels, axis=0)
    x, _ = preprocess(image, np.diag([*spacing_ras, 1.0]), spec)
    patch = list(spec.patch_size)
    pad = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for p, s in zip(patch, x.shape[1:])]
    x = np.pad(x, [(0, 0), *pad])
    starts = [(s - p) // 2 for s, p in zip(x.shape[1:], patch)]
    region = tuple(slice(b, b + p) for b, p in zip(starts, patch))
    return np.ascontiguousarray(x[(slice(None), *region)], dtype=np.float32)


def verify_onnx(model: torch.nn.Module, path: Path, spec: ModelSpec) -> dict:
    """onnxruntime (CPU) vs the PyTorch model on random patches at batch sizes 1 and 3 (the traced
    batch was 2, so both prove the dynamic axis) and on a real-geometry patch; raises on a mismatch."""
    session = OnnxRuntimeNetwork(path)
    generator = torch.Generator().manual_seed(0)
    cases = {
        "random batch 1": torch.randn((1, spec.in_channels, *spec.patch_size), generator=generator),
        "random batch 3": torch.randn((3, spec.in_channels, *spec.patch_size), generator=generator),
        "real-geometry CT patch": torch.from_numpy(real_geometry_patch(spec))[None],
    }
    worst, allowed_min = 0.0, float("inf")
    for what, x in cases.items():
        with torch.no_grad():
            expected = model(x)
        got = session(x)
        if got.shape != expected.shape:
            raise CheckpointError(f"ONNX export check failed ({what}): {path} returns shape {tuple(got.shape)}, "
                                  f"PyTorch {tuple(expected.shape)}")
        diff = float((got - expected).abs().max())
        allowed = PARITY_RTOL * max(1.0, float(expected.abs().max()))
        if not diff <= allowed:  # also catches NaN
            raise CheckpointError(f"ONNX export check failed ({what}): {path} differs from PyTorch by up to {diff:.3g} "
                                  f"(allowed {allowed:.3g} = {PARITY_RTOL} x the largest logit); the export is wrong")
        worst, allowed_min = max(worst, diff), min(allowed_min, allowed)
    return {"max_abs_diff": worst, "allowed_abs_diff": allowed_min, "batch_sizes": [1, 3],
            "checked": list(cases), "onnxruntime_version": require("onnxruntime").__version__}


class OnnxRuntimeNetwork:
    """An onnxruntime session with the network's calling convention: ``torch [B, C, *patch] -> torch
    [B, classes, *patch]`` on the input's device. It is the one piece ``predict --backend
    onnxruntime`` swaps in; the sliding window around it is the torch path's."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", threads: int | None = None):
        ort = require("onnxruntime")
        device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise OnnxUnavailableError(
                    f"--device {device}: this onnxruntime has no CUDA provider "
                    f"(available: {ort.get_available_providers()}); pip install onnxruntime-gpu, or use --device cpu")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})] + providers
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits).to(x.device)


def find_onnx(path: str | Path) -> Path:
    """The ``.onnx`` file given itself or an export folder holding ``onnx/model.onnx``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return path
    for candidate in (path / ONNX_RELPATH, path / ONNX_RELPATH.name):
        if path.is_dir() and candidate.is_file():
            return candidate
    raise CheckpointError(f"{path}: no ONNX model here (expected a .onnx file or an export folder with "
                          f"{ONNX_RELPATH}); export one with: stunet-scale export SOURCE OUT --formats onnx")


def read_spec(path: str | Path) -> ModelSpec:
    """The ModelSpec stored in an exported ``.onnx`` (graph only; external weights are not read)."""
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if SPEC_METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: ONNX file without {SPEC_METADATA_KEY!r} metadata (not written by "
                              f"`stunet-scale export --formats onnx`); predict needs it for spacing and normalisation")
    return ModelSpec.from_dict(json.loads(meta[SPEC_METADATA_KEY]))


def load_onnx_network(path: str | Path, device: torch.device | str = "cpu") -> tuple[Callable, ModelSpec]:
    """(onnxruntime network, spec) from an export folder or ``.onnx`` file, for ``predict``."""
    require("onnx")  # reads the spec from the file's metadata
    require("onnxruntime")
    onnx_path = find_onnx(path)
    return OnnxRuntimeNetwork(onnx_path, device), read_spec(onnx_path)
