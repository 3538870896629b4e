"""``stunet-scale evaluate PRED GT --labels EXPORT``: per-class metrics of predicted labels, matched by name.

    stunet-scale evaluate seg.nii.gz demo_raw/s0007 --labels exports/debug --out dice.json
    stunet-scale evaluate segs/ Dataset900_X/labelsTr --labels segs/labels.json

A prediction is a label NIfTI (``stunet-scale predict`` writes one in the input's geometry) whose
values mean the classes its *label names* say: ``config.json`` of an export folder, the
``labels.json`` predict writes beside its output, a ``dataset.json``, or an explicit list. The
reference is

* a **TotalSegmentator case folder** (``CASE/segmentations/<class>.nii.gz``, one binary mask per
  class), or
* an **nnU-Net label NIfTI** whose values are named by a ``dataset.json`` (``--reference-labels``;
  by default the ``dataset.json`` beside or above the file's folder).

Classes are paired **by name**: prediction value k is compared with the reference class of the name
``labels[k]``, never with reference value k. A label map permuted anywhere between the raw masks and
the predicted labels (prepare, training, export, predict) therefore shows up as near-zero Dice of the
swapped classes instead of being compared consistently wrong on both sides. Only names both sides
know are scored; the others are listed (``unmatched``).

Convention (per class, per case):

* reference and prediction both empty -> the metric is **NaN** (nothing to score; reported as
  ``null`` in JSON and left out of every mean);
* reference empty, prediction not empty -> Dice **0** (a false positive, scored);
* otherwise Dice = 2 |P n R| / (|P| + |R|).

Prediction and reference must lie on the same voxel grid (same shape, affine within
``sources.AFFINE_TOL``); anything else is an ``EvaluationError`` naming both files. Every metric is
a per-class function of two boolean masks and the voxel spacing (``METRICS``), so further metrics
(surface Dice, HD95) are one function each.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.sources import AFFINE_TOL, NIFTI_SUFFIXES, CaseError, read_nifti, strip_nifti

CONVENTION = ("per class: both empty -> null (NaN, left out of means); reference empty and prediction not -> 0; "
              "else 2|P n R| / (|P| + |R|). Classes are paired by name.")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together (missing files, label names, other grids)."""


# --------------------------------------------------------------------------------------------
# Metrics: one function per metric, (prediction mask, reference mask, spacing mm) -> float
# --------------------------------------------------------------------------------------------


def dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Dice of two boolean masks: NaN when both are empty, 0 when only one is."""
    p, r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if p + r == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(pred & ref)) / (p + r)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, Sequence[float] | None], float]] = {"dice": dice}


# --------------------------------------------------------------------------------------------
# Label names
# --------------------------------------------------------------------------------------------


def _labels_from_json(obj, source: str) -> dict[int, str]:
    labels = obj.get("labels") if isinstance(obj, dict) else None
    if isinstance(labels, dict) and labels:
        if all(isinstance(v, str) for v in labels.values()):  # {"0": "background", ...}: config.json, labels.json
            try:
                return {int(k): v for k, v in labels.items()}
            except ValueError:
                pass
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):  # dataset.json
            return {int(v): k for k, v in labels.items() if k != "ignore"}
    if isinstance(labels, list) and all(isinstance(v, str) for v in labels):
        return dict(enumerate(labels))
    raise EvaluationError(f"{source}: no usable 'labels' (expected {{value: name}} as in an export's config.json "
                          "or predict's labels.json, or {name: value} as in a dataset.json)")


def load_labels(labels: str | Path | Sequence[str] | Mapping[int, str]) -> dict[int, str]:
    """Label value -> class name, from an export folder (its ``hf/config.json``), a JSON file
    (``config.json``, predict's ``labels.json``, ``dataset.json``), a list of names (index = value)
    or a mapping."""
    if isinstance(labels, Mapping):
        return {int(k): str(v) for k, v in labels.items()}
    if not isinstance(labels, (str, Path)):
        return {k: str(n) for k, n in enumerate(labels)}
    path = Path(labels)
    if path.is_dir():
        # an export folder keeps config.json under hf/ and the nnU-Net dataset.json deeper down
        found = [path / n for n in ("config.json", "labels.json", "dataset.json", "hf/config.json")]
        found = [p for p in found if p.is_file()] or sorted(path.glob("nnunet/*/*/dataset.json"))
        if found:
            path = found[0]
        else:
            raise EvaluationError(f"{labels}: a folder without config.json, labels.json or dataset.json; pass the "
                                  "export folder (config.json) or the labels.json `stunet-scale predict` wrote")
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationError(f"label names: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"label names: {path} is not readable JSON ({e})") from None
    return _labels_from_json(obj, str(path))


def prediction_labels_beside(prediction: Path) -> Path | None:
    """The labels file `stunet-scale predict` writes next to its output, if present."""
    prediction = Path(prediction)
    for p in (prediction.with_name(strip_nifti(prediction.name) + ".labels.json"), prediction.parent / "labels.json",
              prediction / "labels.json"):
        if p.is_file():
            return p
    return None


def _dataset_json_above(path: Path) -> Path | None:
    for d in (path.parent, path.parent.parent):
        if (d / "dataset.json").is_file():
            return d / "dataset.json"
    return None


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """Metrics of one case. ``metrics[metric][class]`` (NaN = both empty); voxel counts per class."""

    case: str
    prediction: str
    reference: str
    metrics: dict[str, dict[str, float]]
    reference_voxels: dict[str, int]
    predicted_voxels: dict[str, int]
    spacing: list[float]
    unmatched: dict[str, list[str]] = field(default_factory=dict)

    @property
    def dice(self) -> dict[str, float]:
        return self.metrics["dice"]

    @property
    def volumes(self) -> dict[str, float]:
        """Reference volume per class in mm^3."""
        v = float(np.prod(self.spacing))
        return {k: n * v for k, n in self.reference_voxels.items()}

    def to_json(self) -> dict:
        return {"case": self.case, "prediction": self.prediction, "reference": self.reference,
                **{m: _nan_to_none(vals) for m, vals in self.metrics.items()},
                "reference_voxels": self.reference_voxels, "predicted_voxels": self.predicted_voxels,
                "spacing_mm": self.spacing, "unmatched": self.unmatched}


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def _nan_to_none(d: Mapping[str, float]) -> dict[str, float | None]:
    return {k: _num(v) for k, v in d.items()}


def _read(path: Path, role: str):
    try:
        return read_nifti(Path(path), role)
    except CaseError as e:
        raise EvaluationError(f"{path}: {e.message}") from None


def _check_grid(pred, ref) -> None:
    from .data.preprocess import affines_close

    fix = ("predict on the reference's own CT (`stunet-scale predict` writes its output in the input's geometry) "
           "or resample the prediction to the reference grid")
    if pred.shape != ref.shape:
        raise EvaluationError(f"geometry mismatch: prediction {pred.path} has shape {pred.shape}, reference "
                              f"{ref.path} has {ref.shape}; {fix}")
    if not affines_close(pred.affine, ref.affine, AFFINE_TOL):
        diff = float(np.abs(pred.affine - ref.affine).max())
        raise EvaluationError(f"geometry mismatch: prediction {pred.path} and reference {ref.path} have different "
                              f"affines (max difference {diff:.4g}); {fix}")


def _reference_kind(reference: Path) -> str:
    if reference.is_dir():
        if (reference / "segmentations").is_dir():
            return "totalseg"
        raise EvaluationError(f"reference {reference}: a folder without segmentations/ (a TotalSegmentator case "
                              "folder holds segmentations/<class>.nii.gz); for nnU-Net give the label file")
    if reference.name.endswith(NIFTI_SUFFIXES):
        if not reference.is_file():
            raise EvaluationError(f"reference {reference} does not exist")
        return "nnunet"
    raise EvaluationError(f"reference {reference}: neither a TotalSegmentator case folder nor a .nii/.nii.gz label file")


def evaluate_case(
    prediction: str | Path,
    reference: str | Path,
    labels: str | Path | Sequence[str] | Mapping[int, str],
    *,
    reference_labels: str | Path | Sequence[str] | Mapping[int, str] | None = None,
    metrics: Sequence[str] = ("dice",),
    case: str | None = None,
) -> CaseResult:
    """Per-class metrics of the label NIfTI ``prediction`` against ``reference``, paired by class name.

    ``labels`` names the prediction's values (see ``load_labels``). ``reference`` is a TotalSegmentator
    case folder or an nnU-Net label NIfTI; for the latter ``reference_labels`` names its values
    (default: the ``dataset.json`` beside or above the file). Background is never scored. Raises
    ``EvaluationError`` for unreadable inputs, unknown metrics and grids that differ.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvaluationError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    prediction, reference = Path(prediction), Path(reference)
    kind = _reference_kind(reference)
    pred_names = {k: n for k, n in load_labels(labels).items() if k != 0 and n != "background"}
    pred = _read(prediction, "label")
    if pred.data.dtype.kind == "f" and not np.array_equal(pred.data, np.round(pred.data)):
        raise EvaluationError(f"{prediction}: values are not whole numbers; expected a label map")
    p = np.asarray(pred.data).astype(np.int64, copy=False)
    spacing = [float(s) for s in np.linalg.norm(pred.affine[:3, :3], axis=0)]

    if kind == "totalseg":
        files = {strip_nifti(f.name): f for f in (reference / "segmentations").iterdir() if f.name.endswith(NIFTI_SUFFIXES)}

        def ref_mask(name):
            m = _read(files[name], "mask")
            _check_grid(pred, m)
            return np.asarray(m.data) > 0

        ref_names = set(files)
    else:
        source = reference_labels if reference_labels is not None else _dataset_json_above(reference)
        if source is None:
            raise EvaluationError(f"reference {reference}: no dataset.json beside or above it to name its label "
                                  "values; pass reference_labels (CLI: --reference-labels)")
        by_name = {n: k for k, n in load_labels(source).items() if k != 0}
        ref = _read(reference, "label")
        _check_grid(pred, ref)
        r = np.asarray(ref.data)

        def ref_mask(name):
            return r == by_name[name]

        ref_names = set(by_name)

    names = [n for _, n in sorted(pred_names.items()) if n in ref_names]
    if not names:
        raise EvaluationError(f"no class name is shared by the prediction's labels ({sorted(pred_names.values())[:5]}"
                              f"...) and the reference {reference} ({sorted(ref_names)[:5]}...); wrong --labels?")
    value = {n: k for k, n in pred_names.items()}
    out = {m: {} for m in metrics}
    ref_vox, pred_vox = {}, {}
    for name in names:
        rm, pm = ref_mask(name), p == value[name]
        ref_vox[name], pred_vox[name] = int(np.count_nonzero(rm)), int(np.count_nonzero(pm))
        for m in metrics:
            out[m][name] = METRICS[m](pm, rm, spacing)
    unmatched = {"prediction_only": sorted(set(pred_names.values()) - ref_names),
                 "reference_only": sorted(ref_names - set(pred_names.values()))}
    return CaseResult(case or (reference.name if kind == "totalseg" else strip_nifti(reference.name)),
                      str(prediction), str(reference), out, ref_vox, pred_vox, spacing, unmatched)


# --------------------------------------------------------------------------------------------
# Summaries and folders
# --------------------------------------------------------------------------------------------


def nanmean(values) -> float:
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    return sum(v) / len(v) if v else math.nan


def mean_over_largest(dice: Mapping[str, float], volumes: Mapping[str, float], k: int = 10) -> float:
    """Mean Dice over the ``k`` classes with the largest reference volume present (volume > 0).

    "Mean Dice over the ten largest classes present". Classes absent from the reference are not
    candidates; fewer than ``k`` present -> the mean over those; none -> NaN.
    """
    return nanmean(dice[n] for n in largest_classes(volumes, k) if n in dice)


def largest_classes(volumes: Mapping[str, float], k: int = 10) -> list[str]:
    """The ``k`` classes with the largest volume > 0, largest first (ties by name)."""
    present = sorted(((-float(v), n) for n, v in volumes.items() if v and v > 0))
    return [n for _, n in present[:k]]


@dataclass
class Evaluation:
    """Metrics over one or more cases: per case, per class means over cases, and summaries."""

    cases: list[CaseResult]
    metrics: Sequence[str] = ("dice",)
    largest_k: int = 10

    def per_class(self, metric: str = "dice") -> dict[str, float]:
        names = list(dict.fromkeys(n for c in self.cases for n in c.metrics[metric]))
        return {n: nanmean(c.metrics[metric].get(n, math.nan) for c in self.cases) for n in names}

    def volumes(self) -> dict[str, float]:
        """Reference volume per class summed over cases (mm^3)."""
        total: dict[str, float] = {}
        for c in self.cases:
            for n, v in c.volumes.items():
                total[n] = total.get(n, 0.0) + v
        return total

    def mean(self, metric: str = "dice") -> float:
        return nanmean(self.per_class(metric).values())

    def mean_over_largest(self, metric: str = "dice", k: int | None = None) -> float:
        return mean_over_largest(self.per_class(metric), self.volumes(), self.largest_k if k is None else k)

    def to_json(self) -> dict:
        k = self.largest_k
        out = {"convention": CONVENTION, "cases": [c.to_json() for c in self.cases]}
        for m in self.metrics:
            out[f"mean_{m}_per_class"] = _nan_to_none(self.per_class(m))
            out[f"mean_{m}"] = _num(self.mean(m))
            out[f"mean_{m}_largest_{k}"] = _num(self.mean_over_largest(m))
        out[f"largest_{k}"] = largest_classes(self.volumes(), k)
        return out


def pair_cases(predictions: Path, references: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction file, reference) for a prediction folder (``<case>.nii.gz``) against a
    TotalSegmentator root (``<case>/segmentations``) or an nnU-Net label folder (``<case>.nii.gz``)."""
    preds = {strip_nifti(f.name): f for f in sorted(predictions.iterdir())
             if f.is_file() and f.name.endswith(NIFTI_SUFFIXES)}
    if not preds:
        raise EvaluationError(f"{predictions}: no .nii/.nii.gz predictions in this folder")
    pairs, missing = [], []
    for case, f in preds.items():
        for ref in (references / case, references / f"{case}.nii.gz", references / f"{case}.nii"):
            if (ref.is_dir() and (ref / "segmentations").is_dir()) or ref.is_file():
                pairs.append((case, f, ref))
                break
        else:
            missing.append(case)
    if missing:
        raise EvaluationError(f"no reference in {references} for prediction(s) {missing[:5]} (expected "
                              f"{references}/<case>/segmentations/ or {references}/<case>.nii.gz)")
    return pairs


def evaluate(
    prediction: str | Path,
    reference: str | Path,
    labels: str | Path | Sequence[str] | Mapping[int, str] | None = None,
    *,
    reference_labels: str | Path | Sequence[str] | Mapping[int, str] | None = None,
    metrics: Sequence[str] = ("dice",),
    largest_k: int = 10,
) -> Evaluation:
    """One case (prediction file) or a folder of cases (prediction folder, reference root).

    ``labels`` default: the labels file ``stunet-scale predict`` wrote beside the prediction(s).
    """
    prediction, reference = Path(prediction), Path(reference)
    if prediction.is_dir():
        pairs = pair_cases(prediction, reference)
    elif prediction.is_file():
        pairs = [(None, prediction, reference)]
    else:
        raise EvaluationError(f"prediction {prediction} does not exist")
    names = load_labels(labels) if labels is not None else None
    cases = []
    for c, p, r in pairs:
        case_names = names
        if case_names is None:  # predict's labels.json of the folder, or <case>.labels.json of the file
            beside = prediction_labels_beside(p)
            if beside is None:
                raise EvaluationError(f"no label names for {p}: pass --labels EXPORT_DIR (its hf/config.json) or "
                                      "the labels.json `stunet-scale predict` wrote")
            case_names = load_labels(beside)
        cases.append(evaluate_case(p, r, case_names, reference_labels=reference_labels, metrics=metrics, case=c))
    return Evaluation(cases, tuple(metrics), largest_k)


def format_table(ev: Evaluation, metric: str = "dice") -> str:
    """A per-class table (reference volume, mean metric over cases), the mean and the largest-k mean."""
    per = ev.per_class(metric)
    vols = ev.volumes()
    order = sorted(per, key=lambda n: (-vols.get(n, 0.0), n))
    width = max([len("class"), *map(len, order)])
    lines = [f"{'class':<{width}}  {'ref mL':>9}  {metric:>6}", "-" * (width + 19)]
    for n in order:
        v = per[n]
        lines.append(f"{n:<{width}}  {vols.get(n, 0.0) / 1000:>9.1f}  {'-' if math.isnan(v) else f'{v:.4f}':>6}")
    fmt = lambda x: "-" if math.isnan(x) else f"{x:.4f}"  # noqa: E731
    lines.append("-" * (width + 19))
    lines.append(f"{len(ev.cases)} case(s); mean {metric} over {sum(not math.isnan(v) for v in per.values())} "
                 f"scored classes: {fmt(ev.mean(metric))}; over the {ev.largest_k} largest classes present: "
                 f"{fmt(ev.mean_over_largest(metric))}")
    return "\n".join(lines)


def run_evaluate(args) -> int:
    """CLI handler body for ``stunet-scale evaluate`` (exit 0 ok, 1 ``--goal`` missed, 2 inputs that cannot
    be evaluated)."""
    import sys

    try:
        ev = evaluate(args.prediction, args.reference, args.labels, reference_labels=args.reference_labels,
                      largest_k=args.largest)
    except EvaluationError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(format_table(ev))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(ev.to_json(), indent=2) + "\n")
        print(f"wrote {out}")
    goal = getattr(args, "goal", None)
    if goal is None:
        return 0
    got = ev.mean_over_largest()
    met = not math.isnan(got) and got >= goal
    print(f"goal: mean Dice over the {ev.largest_k} largest classes present >= {goal:g}: "
          f"{'met' if met else 'NOT met'} ({got:.4f})")
    return 0 if met else 1
