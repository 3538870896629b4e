"""``stunet-scale evaluate PRED GT --labels EXPORT``: per-class Dice, HD95 and NSD of predicted labels, matched by name.

    stunet-scale evaluate seg.nii.gz demo_raw/s0007 --labels exports/debug --out eval/result.json
    stunet-scale evaluate segs/ Dataset900_X/labelsTr --labels segs/labels.json --workers 8 --nsd-tolerance 2

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

Metrics (per class, per case; definitions and oracle tests in ``surface_metrics``): Dice, HD95 (95th
percentile symmetric Hausdorff distance, mm) and NSD (normalised surface Dice at a tolerance in mm,
one default for all classes or one per class: ``nsd_tolerance``), all in the voxel spacing of the
files (the affine's column norms), so anisotropic voxels are measured in mm.

Convention for empty masks (per class, per case):

* reference and prediction both empty -> every metric is **NaN** (nothing to score; ``null`` in
  JSON, empty in CSV, left out of every mean);
* exactly one of them empty (a false positive or a missed class) -> Dice **0**, NSD **0**, HD95
  **inf** (``"inf"`` in JSON and CSV); the mean HD95 is over the finite values and
  ``hd95_infinite_per_class`` counts the cases left out of it;
* otherwise Dice = 2 |P n R| / (|P| + |R|), HD95 and NSD as ``surface_metrics`` defines them.

Prediction and reference must lie on the same voxel grid (same shape, affine within
``sources.AFFINE_TOL``); anything else is an ``EvaluationError`` naming both files. A folder of
cases is one job per case (``workers`` processes); ``--out RESULT.json`` also writes
``RESULT.csv`` (one row per case and class) and ``RESULT_boxplot.png`` (per-class distributions over
cases, one panel per metric).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.ingest.sources import AFFINE_TOL, NIFTI_SUFFIXES, CaseError, read_nifti, strip_nifti

# dice is re-exported here: the Dice convention lives in surface_metrics
from .surface_metrics import DEFAULT_NSD_TOLERANCE_MM, class_metrics, dice

CONVENTION = ("per class: both empty -> null (NaN, left out of means); exactly one empty -> dice 0, nsd 0, hd95 "
              "\"inf\" (means of hd95 over finite values, hd95_infinite_per_class counts the rest); else "
              "dice 2|P n R| / (|P| + |R|), hd95 and nsd (tolerance mm per class) from 6-connected borders in mm. "
              "Classes are paired by name.")

#: metric names in report order; ``evaluate`` computes these unless told fewer
METRICS: tuple[str, ...] = ("dice", "hd95", "nsd")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together (missing files, label names, other grids)."""


# --------------------------------------------------------------------------------------------
# NSD tolerances
# --------------------------------------------------------------------------------------------


def load_tolerances(value: float | str | Path | Mapping[str, float] | None) -> dict[str, float]:
    """NSD tolerance (mm) per class name, ``"default"`` for the rest: a number, a mapping, or a JSON
    file ``{"default": 2.0, "liver": 3.0, ...}`` (CLI ``--nsd-tolerance 2`` or ``--nsd-tolerance FILE``)."""
    if value is None:
        return {"default": DEFAULT_NSD_TOLERANCE_MM}
    source = "--nsd-tolerance"
    if isinstance(value, (str, Path)):
        try:
            value = float(str(value))
        except ValueError:
            source = str(value)
            try:
                value = json.loads(Path(value).read_text())
            except FileNotFoundError:
                raise EvaluationError(f"NSD tolerances: {source} is neither a number (mm) nor an existing JSON "
                                      "file like {\"default\": 2.0, \"liver\": 3.0}") from None
            except (OSError, json.JSONDecodeError) as e:
                raise EvaluationError(f"NSD tolerances: {source} is not readable JSON ({e})") from None
    if not isinstance(value, Mapping):
        value = {"default": value}
    out = {"default": DEFAULT_NSD_TOLERANCE_MM}
    for name, mm in value.items():
        if isinstance(mm, bool) or not isinstance(mm, (int, float)) or not math.isfinite(mm) or mm < 0:
            raise EvaluationError(f"NSD tolerances ({source}): {name!r} has {mm!r}; give a number of mm >= 0")
        out[str(name)] = float(mm)
    return out


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


def _num(v: float | None) -> float | str | None:
    """JSON value of a metric: NaN -> null, inf -> "inf" (JSON has no infinity), else the float."""
    if v is None or math.isnan(v):
        return None
    return "inf" if math.isinf(v) else float(v)


def _nan_to_none(d: Mapping[str, float]) -> dict[str, float | None]:
    return {k: _num(v) for k, v in d.items()}


def _read(path: Path, role: str):
    try:
        return read_nifti(Path(path), role)
    except CaseError as e:
        raise EvaluationError(f"{path}: {e.message}") from None


def _check_grid(pred, ref) -> None:
    from .data.ingest.preprocess import affines_close

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
    metrics: Sequence[str] = METRICS,
    nsd_tolerance: float | str | Path | Mapping[str, float] | None = None,
    case: str | None = None,
) -> CaseResult:
    """Per-class metrics of the label NIfTI ``prediction`` against ``reference``, paired by class name.

    ``labels`` names the prediction's values (see ``load_labels``). ``reference`` is a TotalSegmentator
    case folder or an nnU-Net label NIfTI; for the latter ``reference_labels`` names its values
    (default: the ``dataset.json`` beside or above the file). Background is never scored.
    ``nsd_tolerance``: mm for every class, or per class name with a ``"default"`` (``load_tolerances``).
    Raises ``EvaluationError`` for unreadable inputs, unknown metrics and grids that differ.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvaluationError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    tolerances = load_tolerances(nsd_tolerance)
    surface = any(m != "dice" for m in metrics)
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
        # the surface metrics share one pair of border-distance searches per class (cropped to the class)
        got = (class_metrics(pm, rm, spacing, tolerances.get(name, tolerances["default"])) if surface
               else {"dice": dice(pm, rm)})
        for m in metrics:
            out[m][name] = got[m]
    unmatched = {"prediction_only": sorted(set(pred_names.values()) - ref_names),
                 "reference_only": sorted(ref_names - set(pred_names.values()))}
    return CaseResult(case or (reference.name if kind == "totalseg" else strip_nifti(reference.name)),
                      str(prediction), str(reference), out, ref_vox, pred_vox, spacing, unmatched)


# --------------------------------------------------------------------------------------------
# Summaries and folders
# --------------------------------------------------------------------------------------------


def nanmean(values) -> float:
    """Mean of the finite values (NaN = nothing to score, inf = HD95 of a one-sided miss: both left out)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
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
    metrics: Sequence[str] | None = None  # default: the metrics the cases have
    largest_k: int = 10

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = tuple(m for m in METRICS if self.cases and all(m in c.metrics for c in self.cases))

    def infinite_per_class(self, metric: str = "hd95") -> dict[str, int]:
        """Cases per class whose value is inf (one mask empty), i.e. left out of the HD95 mean."""
        names = list(dict.fromkeys(n for c in self.cases for n in c.metrics[metric]))
        return {n: sum(math.isinf(c.metrics[metric].get(n, math.nan)) for c in self.cases) for n in names}

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
        if "hd95" in self.metrics:
            out["hd95_infinite_per_class"] = self.infinite_per_class("hd95")
        out[f"largest_{k}"] = largest_classes(self.volumes(), k)
        return out

    def write_csv(self, path: Path) -> Path:
        """One row per case and class: the metrics (empty = NaN, "inf" = one-sided miss) and voxel counts."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case", "class", *self.metrics, "reference_voxels", "predicted_voxels"])
            for c in self.cases:
                for name in c.metrics[self.metrics[0]]:
                    vals = [_num(c.metrics[m][name]) for m in self.metrics]
                    w.writerow([c.case, name, *("" if v is None else v for v in vals),
                                c.reference_voxels.get(name, 0), c.predicted_voxels.get(name, 0)])
        return path

    def plot_boxes(self, path: Path) -> Path | None:
        """Per-class box plots over cases, one panel per metric (finite values; classes ordered by
        reference volume). None when no metric has a finite value."""
        vols = self.volumes()
        # classes empty on both sides in every case have nothing to show: left out, not empty columns
        scored = [n for n in self.per_class(self.metrics[0])
                  if any(math.isfinite(c.metrics[m].get(n, math.nan)) for m in self.metrics for c in self.cases)]
        names = sorted(scored, key=lambda n: (-vols.get(n, 0.0), n))
        panels = []
        for m in self.metrics:
            data = [[float(c.metrics[m][n]) for c in self.cases if n in c.metrics[m] and math.isfinite(c.metrics[m][n])]
                    for n in names]
            if any(data):
                panels.append((m, data))
        if not panels:
            return None
        from .tracking import _plt, _save_figure

        plt = _plt()
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.25 * len(names) + 2), 3 * len(panels)),
                                 sharex=True, squeeze=False)
        units = {"dice": "Dice", "hd95": "HD95 (mm)", "nsd": "NSD"}
        for ax, (m, data) in zip(axes[:, 0], panels):
            ax.boxplot([d if d else [math.nan] for d in data], showfliers=True)
            ax.set_ylabel(units.get(m, m))
            if m != "hd95":
                ax.set_ylim(0, 1.02)
        axes[-1, 0].set_xticks(range(1, len(names) + 1))
        axes[-1, 0].set_xticklabels(names, rotation=90, fontsize=6)
        axes[0, 0].set_title(f"per-class metrics over {len(self.cases)} case(s)", fontsize=9)
        path = Path(path)
        _save_figure(plt, fig, path)
        return path


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
    metrics: Sequence[str] = METRICS,
    largest_k: int = 10,
    nsd_tolerance: float | str | Path | Mapping[str, float] | None = None,
    workers: int = 1,
) -> Evaluation:
    """One case (prediction file) or a folder of cases (prediction folder, reference root).

    ``labels`` default: the labels file ``stunet-scale predict`` wrote beside the prediction(s).
    ``workers`` > 1: cases run in that many processes (results in case order either way).
    """
    prediction, reference = Path(prediction), Path(reference)
    if prediction.is_dir():
        pairs = pair_cases(prediction, reference)
    elif prediction.is_file():
        pairs = [(None, prediction, reference)]
    else:
        raise EvaluationError(f"prediction {prediction} does not exist")
    if workers < 1:
        raise EvaluationError(f"workers must be >= 1, got {workers}")
    names = load_labels(labels) if labels is not None else None
    if reference_labels is not None and not isinstance(reference_labels, (str, Path)):
        reference_labels = load_labels(reference_labels)  # a plain dict travels to worker processes
    tolerances = load_tolerances(nsd_tolerance)  # bad tolerances fail before any case is read
    jobs = []
    for c, p, r in pairs:
        case_names = names
        if case_names is None:  # predict's labels.json of the folder, or <case>.labels.json of the file
            beside = prediction_labels_beside(p)
            if beside is None:
                raise EvaluationError(f"no label names for {p}: pass --labels EXPORT_DIR (its hf/config.json) or "
                                      "the labels.json `stunet-scale predict` wrote")
            case_names = load_labels(beside)
        jobs.append({"prediction": p, "reference": r, "labels": case_names, "reference_labels": reference_labels,
                     "metrics": tuple(metrics), "nsd_tolerance": tolerances, "case": c})
    if workers == 1 or len(jobs) == 1:
        cases = [evaluate_case(**job) for job in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per worker, safe whatever threads the caller runs (MLflow, torch)
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            cases = list(pool.map(_evaluate_job, jobs))
    return Evaluation(cases, tuple(metrics), largest_k)


def _evaluate_job(job: dict) -> CaseResult:
    return evaluate_case(**job)


def format_table(ev: Evaluation, metric: str | None = None) -> str:
    """A per-class table (reference volume, mean of each metric over cases), then the mean and the
    largest-k mean of each metric. ``metric``: only that one column."""
    metrics = [metric] if metric else list(ev.metrics)
    per = {m: ev.per_class(m) for m in metrics}
    vols = ev.volumes()
    order = sorted(per[metrics[0]], key=lambda n: (-vols.get(n, 0.0), n))
    width = max([len("class"), *map(len, order)])
    heads = {"dice": "dice", "hd95": "hd95 mm", "nsd": "nsd"}
    cols = "".join(f"  {heads.get(m, m):>8}" for m in metrics)
    rule = "-" * (width + 11 + 10 * len(metrics))
    def fmt(x):
        return "-" if math.isnan(x) else f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"

    lines = [f"{'class':<{width}}  {'ref mL':>9}{cols}", rule]
    for n in order:
        lines.append(f"{n:<{width}}  {vols.get(n, 0.0) / 1000:>9.1f}" + "".join(f"  {fmt(per[m][n]):>8}" for m in metrics))
    lines.append(rule)
    for m in metrics:
        scored = sum(not math.isnan(v) for v in per[m].values())
        extra = ""
        if m == "hd95":
            misses = sum(ev.infinite_per_class("hd95").values())
            extra = f" ({misses} class-case pair(s) with one side empty left out: inf)" if misses else ""
        lines.append(f"{len(ev.cases)} case(s); mean {m} over {scored} scored classes: {fmt(ev.mean(m))}; over the "
                     f"{ev.largest_k} largest classes present: {fmt(ev.mean_over_largest(m))}{extra}")
    return "\n".join(lines)


def output_paths(out: str | Path) -> dict[str, Path]:
    """``--out RESULT.json`` -> the JSON, ``RESULT.csv`` and ``RESULT_boxplot.png`` beside it."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    return {"json": stem.with_suffix(".json"), "csv": stem.with_suffix(".csv"),
            "png": stem.with_name(stem.name + "_boxplot.png")}


def run_evaluate(args) -> int:
    """CLI handler body for ``stunet-scale evaluate`` (exit 0 ok, 1 ``--goal`` missed, 2 inputs that cannot
    be evaluated)."""
    import sys

    metrics = tuple(getattr(args, "metrics", None) or METRICS)
    try:
        ev = evaluate(args.prediction, args.reference, args.labels, reference_labels=args.reference_labels,
                      largest_k=args.largest, metrics=metrics, nsd_tolerance=getattr(args, "nsd_tolerance", None),
                      workers=getattr(args, "workers", 1) or 1)
    except EvaluationError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(format_table(ev))
    if args.out:
        paths = output_paths(args.out)
        paths["json"].parent.mkdir(parents=True, exist_ok=True)
        paths["json"].write_text(json.dumps(ev.to_json(), indent=2) + "\n")
        written = [paths["json"], ev.write_csv(paths["csv"]), ev.plot_boxes(paths["png"])]
        print("wrote " + ", ".join(str(p) for p in written if p is not None))
    goal = getattr(args, "goal", None)
    if goal is None:
        return 0
    if "dice" not in ev.metrics:
        print("evaluate: error: --goal is a Dice goal; keep dice in --metrics", file=sys.stderr)
        return 2
    got = ev.mean_over_largest()
    met = not math.isnan(got) and got >= goal
    print(f"goal: mean Dice over the {ev.largest_k} largest classes present >= {goal:g}: "
          f"{'met' if met else 'NOT met'} ({got:.4f})")
    return 0 if met else 1
