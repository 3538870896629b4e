"""``stunet-scale predict CHECKPOINT INPUT OUTPUT``: segment NIfTI CTs, output in the input's own geometry.

    stunet-scale predict exports/stunet_b ct.nii.gz seg.nii.gz --mirror
    stunet-scale predict base_ep4k.model cts/ segs/ --classes liver spleen --device cuda

Per case, exactly the preprocessing the weights were trained with (``ModelSpec`` of the checkpoint;
for a released STU-Net file the paper's: 1.5 mm, per-image z-score, SimpleITK axis order):

1. reorient to RAS (a flip/transpose, no interpolation) and, for the released models, transpose to
   (z, y, x) as nnU-Net v1 read images;
2. crop to nnU-Net's nonzero box (for a CT the whole image; ``body``, voxels > -500 HU, for
   models trained with ``data.normalization=zscore_stored``) and resample to the model spacing, with
   the store's interpolation (``stunet_scale.data.ingest.preprocess``: the same code ``prepare`` runs);
3. per-image z-score with nnU-Net's statistics of the original image over that box (or over the
   stored crop for ``zscore_stored``, or nnU-Net CT normalisation with the dataset statistics);
4. sliding-window inference with Gaussian weighting (``stunet_scale.inference``), optional mirroring
   TTA over the axes flipped in training, bf16 autocast on GPU, fp32 on CPU;
5. logits resampled back linearly to the cropped grid and arg-maxed a few classes at a time (never
   the full C x X x Y x Z volume at input resolution: 105 classes x 512^2 x 600 would be 66 GB),
   pasted into the crop, reoriented back; saved with the input's affine, qform and sform.

Label names go next to the output: ``OUTPUT/labels.json`` for a folder, ``<name>.labels.json`` for
a file. ``--classes`` keeps a subset (other voxels become 0; label values are not renumbered).
Every output is written to a temporary name and renamed, so an interrupted run leaves no
half-written NIfTI; a case that fails (unreadable file, 4-D image, NaN) is reported by name and the
others still run.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .atomic_files import atomic_path
from .data.ingest.sources import NIFTI_SUFFIXES, strip_nifti
from .export.model_input import preprocess

log = logging.getLogger("stunet_scale.predict")

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class PredictError(ValueError):
    """A case that cannot be predicted; the message names the file."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _stem(path: Path) -> str:
    return strip_nifti(path.name)


def list_cases(input_path: Path, in_channels: int) -> dict[str, list[Path]]:
    """case id -> channel files. nnU-Net naming (``case_0000.nii.gz``) is understood; with one
    channel a plain ``case.nii.gz`` works too."""
    if input_path.is_file():
        files = [input_path]
    elif input_path.is_dir():
        files = sorted(p for p in input_path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise PredictError(f"{input_path}: no .nii/.nii.gz files in this folder")
    else:
        raise PredictError(f"input not found: {input_path}")
    cases: dict[str, dict[int, Path]] = {}
    for f in files:
        m = _CHANNEL.match(_stem(f))
        # nnU-Net names channels case_0000, case_0001, ...; a one-channel model also takes plain names.
        if m and (in_channels > 1 or int(m.group("channel")) == 0):
            case, channel = m.group("case"), int(m.group("channel"))
        else:
            case, channel = _stem(f), 0
        if channel in cases.setdefault(case, {}):
            raise PredictError(f"{f}: two files for case {case!r} channel {channel}")
        cases[case][channel] = f
    out = {}
    for case, channels in sorted(cases.items()):
        if sorted(channels) != list(range(in_channels)):
            raise PredictError(
                f"case {case!r}: the model takes {in_channels} channel(s) named {case}_0000 .. {case}_{in_channels - 1:04d}, "
                f"found channels {sorted(channels)} in {input_path}"
            )
        out[case] = [channels[c] for c in range(in_channels)]
    return out


# prepare's reason code -> what predict says about the file (the user fixes the file, not a dataset)
_CASE_ERROR_TEXT = {
    "IO_CORRUPT": "cannot read NIfTI ({msg}); is it truncated?",
    "IMAGE_2D": "expected a 3-D image ({msg})",
    "IMAGE_4D": "expected a 3-D image ({msg}); split 4-D series into channel files",
    "NONFINITE": "contains NaN/Inf voxels ({msg}); fix or mask them before predicting",
    "NON_ORTHONORMAL": "the header's geometry is broken ({msg})",
    "QFORM_SFORM_MISMATCH": "the header's geometry is ambiguous ({msg})",
    "SHAPE_MISMATCH": "channel geometry differs from the first channel ({msg}); channels must be co-registered",
    "AFFINE_MISMATCH": "channel geometry differs from the first channel ({msg}); channels must be co-registered",
}


def read_case(files: Sequence[Path]):
    """(image [C, x, y, z] float32 in the file's voxel order, affine, reference header).

    The files are read and validated by ``sources.read_nifti`` / ``check_same_grid``, the code
    ``prepare`` quarantines training cases with (full read, every trailing singleton axis squeezed,
    NaN/Inf, orthonormal affine, qform = sform, co-registered channels); a defect becomes a
    ``PredictError`` naming the file, so the other cases of a folder still run.
    """
    from .data.ingest.sources import CaseError, check_same_grid, read_nifti

    niftis = []
    for f in files:
        try:
            nii = read_nifti(Path(f), "image")
            if niftis:
                check_same_grid(niftis[0], nii)
        except CaseError as e:
            text = _CASE_ERROR_TEXT.get(e.code, "{msg}").format(msg=e.message)
            raise PredictError(f"{f}: {text}") from None
        niftis.append(nii)
    image = np.stack([n.data.astype(np.float32, copy=False) for n in niftis])
    return image, niftis[0].affine, niftis[0].header


# --------------------------------------------------------------------------------------------
# The geometry: file grid <-> network grid
# --------------------------------------------------------------------------------------------


def _resample_logits(chunk: torch.Tensor, out_shape: list[int], separate: int | None) -> torch.Tensor:
    """``chunk [c, X', Y', Z']`` -> ``[c, *out_shape]``: edge-aligned linear, or, with a ``separate``
    (thick-slice) axis, linear in-plane and nearest along that axis, as nnU-Net resamples
    probabilities back (``order=1, order_z=0``) so thick slices are not blended into each other."""
    if separate is None:
        return F.interpolate(chunk[None].float(), size=out_shape, mode="trilinear", align_corners=False)[0]
    from .data.ingest.preprocess import _nearest_index

    moved = chunk.float().movedim(separate + 1, 1)  # [c, S, a, b]: the thick axis as channels
    plane = [out_shape[a] for a in range(3) if a != separate]
    if list(moved.shape[2:]) != plane:
        moved = F.interpolate(moved, size=plane, mode="bilinear", align_corners=False)
    if moved.shape[1] != out_shape[separate]:
        idx = torch.from_numpy(_nearest_index(moved.shape[1], out_shape[separate])).to(moved.device)
        moved = moved.index_select(1, idx)
    return moved.movedim(1, separate + 1)


def logits_to_labels(logits: torch.Tensor, out_shape: Sequence[int], max_bytes: int = 512 << 20,
                     separate: int | None = None) -> torch.Tensor:
    """Resample ``logits [C, X', Y', Z']`` to ``out_shape`` and arg-max, a few classes at a time.

    Equals ``argmax(F.interpolate(logits[None], out_shape, mode="trilinear"))`` (edge-aligned, the
    convention of ``stunet_scale.data.ingest.preprocess``), or with ``separate`` nnU-Net's thick-slice rule
    (``_resample_logits``), without holding the full-resolution ``[C, X, Y, Z]`` tensor: each chunk
    of classes is interpolated, then a running maximum keeps the best class (the first one on ties,
    as ``argmax``). Peak extra memory: ``max_bytes`` or one class at output size, plus 5 bytes per
    output voxel.
    """
    c = logits.shape[0]
    out_shape = [int(s) for s in out_shape]
    dtype = torch.uint8 if c <= 256 else torch.int16
    if list(logits.shape[1:]) == out_shape:
        return logits.argmax(0).to(dtype)
    per_class = 4 * int(np.prod(out_shape))
    k = max(1, min(c, max_bytes // per_class))
    best = labels = None
    for c0 in range(0, c, k):
        chunk = _resample_logits(logits[c0:c0 + k], out_shape, separate)
        value, index = chunk.max(0)
        index = (index + c0).to(dtype)
        if best is None:
            best, labels = value, index
        else:
            better = value > best
            best = torch.where(better, value, best)
            labels = torch.where(better, index, labels)
        del chunk
    return labels


def restore_labels(labels: np.ndarray, geometry) -> np.ndarray:
    """Labels on the cropped RAS grid (x, y, z) -> the original file's voxel grid."""
    from .data.ingest.preprocess import paste_to_original

    return paste_to_original(labels, geometry, 0)


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None
    step_size: float = 0.5
    mirror_axes: tuple[int, ...] = ()
    batch_size: int = 1
    progress: bool = True


def network_logits(network: Callable, spec, image: np.ndarray, affine: np.ndarray, rt: Runtime):
    """(logits ``[C, ...]`` on the network grid in the spec's axis order, network input, ``Geometry``).

    What the network computes on a file-grid ``image [C, x, y, z]``: the tensors a downstream tool
    (nnU-Net's ``predict_logits_from_preprocessed_data``) is compared against.
    """
    from .inference import sliding_window_inference

    x, geometry = preprocess(image, affine, spec)
    tensor = torch.from_numpy(x)
    out_device = _out_device(rt.device, spec.num_classes, x.shape[1:])
    kwargs = dict(step_size=rt.step_size, mirror_axes=rt.mirror_axes, batch_size=rt.batch_size, device=rt.device,
                  autocast_dtype=rt.autocast_dtype, progress=rt.progress)
    try:
        logits = sliding_window_inference(network, tensor, spec.patch_size, out_device=out_device, **kwargs)
    except torch.cuda.OutOfMemoryError:
        if out_device.type == "cpu":
            raise
        # nnU-Net's fallback: keep the forwards on the GPU, accumulate the logits in host memory.
        log.warning("GPU out of memory for the logits of a %s volume; accumulating on the CPU instead", x.shape[1:])
        torch.cuda.empty_cache()
        logits = sliding_window_inference(network, tensor, spec.patch_size, out_device="cpu", **kwargs)
    return logits, x, geometry


def segment(network: Callable, spec, image: np.ndarray, affine: np.ndarray, rt: Runtime) -> tuple[np.ndarray, dict]:
    """Labels ``[x, y, z]`` in the file's voxel grid for ``image [C, x, y, z]`` (+ timing info)."""
    t1 = time.time()
    logits, x, geometry = network_logits(network, spec, image, affine, rt)
    t2 = time.time()
    if spec.axis_order == "ras_zyx":
        logits = logits.permute(0, 3, 2, 1)
    labels = logits_to_labels(logits, geometry.cropped_shape, separate=geometry.separate_axis).cpu().numpy()
    del logits
    out = restore_labels(labels, geometry)
    info = {"network_shape": list(x.shape[1:]), "spacing": geometry.spacing, "inference_s": t2 - t1,
            "postprocess_s": time.time() - t2}
    return out, info


def _out_device(device: torch.device, num_classes: int, shape) -> torch.device:
    """Accumulate logits on the GPU when they take at most half of its free memory, else on the host."""
    if device.type != "cuda":
        return device
    need = 4 * num_classes * int(np.prod(shape)) * 1.2
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.5 * free else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def save_labels(labels: np.ndarray, reference, path: Path) -> None:
    """Write ``labels`` with the geometry of ``reference`` (the input's NIfTI header or image: affine,
    qform, sform, units), atomically."""
    import nibabel as nib

    hdr = getattr(reference, "header", reference)
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    img = nib.Nifti1Image(labels.astype(dtype, copy=False), hdr.get_best_affine())
    img.set_qform(hdr.get_qform(), code=int(hdr["qform_code"]))
    img.set_sform(hdr.get_sform(), code=int(hdr["sform_code"]))
    img.header.set_xyzt_units(*hdr.get_xyzt_units())
    img.header.set_data_dtype(dtype)
    with atomic_path(path, keep_suffix=True) as tmp:  # nibabel picks .nii / .nii.gz from the name
        nib.save(img, str(tmp))


def label_info(spec, keep: list[int] | None, checkpoint: str) -> dict:
    ids = list(range(spec.num_classes)) if keep is None else [0] + [k for k in keep if k != 0]
    return {
        "labels": {str(k): spec.labels[k] for k in ids},
        "class_map": spec.class_map,
        "totalsegmentator_version": spec.totalseg_version,
        "model": str(checkpoint),
        "spacing_mm": spec.spacing,
        "note": "label values are output channels of the model; classes not listed were not kept",
    }


def parse_classes(classes: Sequence[str] | None, spec) -> list[int] | None:
    """``--classes`` entries are names or integer label values; returns sorted label values."""
    if not classes:
        return None
    keep = set()
    for item in classes:
        for token in str(item).split(","):
            token = token.strip()
            if not token:
                continue
            if token.isdigit():
                k = int(token)
                if not 0 <= k < spec.num_classes:
                    raise PredictError(f"--classes {token}: the model has labels 0..{spec.num_classes - 1}")
            elif token in spec.labels:
                k = spec.labels.index(token)
            else:
                import difflib

                close = difflib.get_close_matches(token, spec.labels, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see labels.json for the names"
                raise PredictError(f"--classes {token!r} is not a class of this model{hint}")
            keep.add(k)
    return sorted(keep)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def pick_precision(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        if device.type != "cuda":
            return None  # bf16 autocast on CPU is slower than fp32 on most CPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def load_model(checkpoint: str | Path, device: torch.device):
    """(network in eval mode on ``device``, its ModelSpec) from any checkpoint ``read_weights`` accepts."""
    import dataclasses

    from .export.checkpoint_io import read_weights
    from .models.stunet import STUNet

    weights = read_weights(checkpoint)
    spec = weights.spec
    model = STUNet(dataclasses.replace(spec.model_config, deep_supervision=False))
    model.load_state_dict(weights.state_dict, strict=True)
    return model.to(device).eval(), spec


def predict(
    checkpoint: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    mirror: bool = False,
    device: str = "auto",
    step_size: float = 0.5,
    batch_size: int = 1,
    precision: str = "auto",
    overwrite: bool = True,
    network: Callable | None = None,
    spec=None,
    backend: str = "torch",
    label_map: str | Path | None = None,
) -> dict:
    """Segment one NIfTI or a folder; returns {"written": [...], "failed": {file: error}, "seconds": s}.

    ``network``/``spec`` replace the checkpoint's (tests and custom pipelines). ``backend``
    "onnxruntime" runs an exported ``.onnx`` (``stunet_scale.export.onnx_model``) in place of the
    torch module; everything around the network call is the same code. ``label_map`` (a shipped
    name such as "btcv" or a JSON file, ``stunet_scale.label_mapping``) writes the target dataset's
    label ids instead of the model's, merging the sources a target lists.
    """
    t_start = time.time()
    dev = pick_device(device)
    backend_note = ""
    if backend not in ("torch", "onnxruntime"):
        raise PredictError(f"--backend {backend!r}: choose torch or onnxruntime")
    if network is None and backend == "onnxruntime":
        network, spec, dev, backend_note = _onnxruntime_network(checkpoint, device, dev, precision)
        precision = "fp32"
    elif network is None:
        network, spec = load_model(checkpoint, dev)
    if not 0 < step_size <= 1:
        raise PredictError(f"--step-size must be in (0, 1], got {step_size}")
    keep = parse_classes(classes, spec)
    mapping = table = None
    if label_map is not None:
        from .label_mapping import LabelMapError, load_label_map

        if keep is not None:
            raise PredictError("--classes and --label-map together: the label map already chooses (and merges) the "
                               "classes; drop --classes")
        try:
            mapping = load_label_map(label_map)
            table = mapping.lookup_table(list(spec.labels))
        except LabelMapError as e:
            raise PredictError(str(e)) from None
    input_path, output_path = Path(input_path), Path(output_path)
    cases = list_cases(input_path, spec.in_channels)
    if output_path.name.endswith(NIFTI_SUFFIXES):  # one case -> one file, label names beside it
        if len(cases) != 1:
            raise PredictError(f"{output_path} is a file name but {input_path} holds {len(cases)} cases; give an output folder")
        output_path.parent.mkdir(parents=True, exist_ok=True)
        targets = {next(iter(cases)): output_path}
        labels_file = output_path.with_name(_stem(output_path) + ".labels.json")
    else:
        output_path.mkdir(parents=True, exist_ok=True)
        targets = {case: output_path / f"{case}.nii.gz" for case in cases}
        labels_file = output_path / "labels.json"
    mirror_axes = tuple(spec.mirror_axes) if mirror else ()
    if mirror and not mirror_axes:
        log.warning("--mirror: the model was trained without flips; mirroring TTA is skipped")
    rt = Runtime(device=dev, autocast_dtype=pick_precision(precision, dev), step_size=step_size,
                 mirror_axes=mirror_axes, batch_size=batch_size, progress=True)
    info_json = mapping.labels_json(str(checkpoint)) if mapping else label_info(spec, keep, str(checkpoint))
    labels_file.write_text(json.dumps(info_json, indent=2) + "\n")
    print(f"predict: {len(cases)} case(s) on {dev}{backend_note} ({rt.autocast_dtype or torch.float32}), "
          f"model spacing {spec.spacing} mm, patch {spec.patch_size}, mirroring {list(mirror_axes) or 'off'}",
          flush=True)

    from tqdm import tqdm

    written, failed = [], {}
    for case in tqdm(cases, desc="cases", unit="case", disable=None):
        target = targets[case]
        if target.exists() and not overwrite:
            print(f"  {case}: {target} exists, skipped", flush=True)
            continue
        try:
            image, affine, ref = read_case(cases[case])
            labels, info = segment(network, spec, image, affine, rt)
            if keep is not None:
                labels[~np.isin(labels, keep)] = 0
            if mapping is not None:
                labels = mapping.apply(labels, table)
            save_labels(labels, ref, target)
        except PredictError as e:
            failed[str(cases[case][0])] = str(e)
            print(f"  {case}: FAILED {e}", file=sys.stderr, flush=True)
            continue
        written.append(str(target))
        print(f"  {case}: {list(image.shape[1:])} -> network {info['network_shape']} -> {target.name} "
              f"(preprocess + inference {info['inference_s']:.1f} s, "
              f"restore {info['postprocess_s']:.1f} s)", flush=True)
    return {"written": written, "failed": failed, "labels_file": str(labels_file), "seconds": time.time() - t_start}


def _onnxruntime_network(checkpoint, requested: str, device: torch.device, precision: str):
    """(onnxruntime network, spec, torch device of the sliding window, note) for ``--backend onnxruntime``.

    The graph is fp32, so no autocast. The window stacking and logit accumulation stay on the CPU:
    onnxruntime takes and returns host arrays, so a CUDA torch side would only add copies. With
    ``--device auto`` the GPU is used only if this onnxruntime has a CUDA provider (onnxruntime-gpu)."""
    from .export.onnx_model import load_onnx_network, require

    if precision not in ("auto", "fp32"):
        raise PredictError(f"--precision {precision}: --backend onnxruntime runs the exported fp32 graph; "
                           f"use --precision fp32 (or auto)")
    if requested == "auto" and "CUDAExecutionProvider" not in require("onnxruntime").get_available_providers():
        device = torch.device("cpu")
    network, spec = load_onnx_network(checkpoint, device)
    providers = network.session.get_providers()
    return network, spec, torch.device("cpu"), f", onnxruntime {providers[0]}"


def run_predict(args) -> int:
    """CLI handler body for ``stunet-scale predict``."""
    from .export.checkpoint_io import CheckpointError

    try:
        result = predict(args.checkpoint, args.input, args.output, classes=args.classes, mirror=args.mirror,
                         device=args.device, step_size=args.step_size, batch_size=args.batch_size,
                         precision=args.precision, overwrite=not args.skip_existing,
                         backend=getattr(args, "backend", "torch"), label_map=getattr(args, "label_map", None))
    except (PredictError, CheckpointError) as e:
        print(f"predict failed: {e}", file=sys.stderr)
        return 1
    print(f"predict: wrote {len(result['written'])} segmentation(s), label names in {result['labels_file']} "
          f"({result['seconds']:.1f} s)")
    if result["failed"]:
        print(f"predict: {len(result['failed'])} case(s) failed: {', '.join(result['failed'])}", file=sys.stderr)
        return 1
    return 0
