"""Validation during training: full-case sliding-window Dice and nnU-Net-style pseudo-Dice.

The rule that keeps sharded runs alive: under ZeRO-3 and FSDP2 every forward is a collective
(parameters are all-gathered per module), so every rank must run exactly the same number of
forwards, whatever cases it got. Rank 0 lists the cases and their shapes and broadcasts them, so
every rank works from the same list; from the shapes each rank counts the forwards of every rank's
cases (``inference.count_forwards``), and the last case of each rank (or a dummy window, for a rank
without cases) is padded to the maximum with ``min_forwards``. Cases and plan never change during a
run, so both are computed once.

Dice per class per case: 2TP / (2TP + FP + FN) on the argmax, NaN (left out of the mean) where
the class is absent from both ground truth and prediction; averaged over cases, then over classes.
Pseudo-Dice (nnU-Net): TP/FP/FN summed over a few training-like patches from validation cases
(half centred on foreground), one number per class, cheap enough for every epoch.

Surface metrics (``validation.surface_metrics``, on by default): full validations also score HD95
and NSD at ``validation.nsd_tolerance_mm`` per class per case on the stored grid (``data.spacing``
mm, anisotropic allowed), with ``surface_metrics``' definitions and empty-mask conventions; means
over cases, then over classes, HD95 over finite values only (a class missed on one side is inf and
counted in ``hd95_infinite``, its Dice and NSD are 0). They run on the CPU argmax, each class
cropped to its bounding box, and never on the per-epoch pseudo-Dice patches, so their cost is
bounded by the full validations' cadence (``validation.every_epochs``).

All skip what the labels do not say (as the loss does): voxels with the ignore label (value
``num_classes``, a source class the class map lacks) count for no class, whatever is predicted
there, and a class unannotated in a case (``missing_classes`` of its manifest entry: no mask file)
gets no Dice, HD95 or NSD for that case (NaN, left out of the mean; no counts toward the pseudo-Dice).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.stream.source import DataSource
from ..inference import count_forwards, sliding_window_inference
from ..surface_metrics import label_map_metrics

log = logging.getLogger("stunet_scale.train")

#: keys ``Validator.full`` adds when ``validation.surface_metrics`` is on (the trainer records them)
SURFACE_KEYS = ("mean_hd95", "mean_nsd", "per_class_hd95", "per_class_nsd", "hd95_infinite", "nsd_tolerance_mm")


def confusion_counts(label: torch.Tensor, pred: torch.Tensor, num_classes: int,
                     unannotated: Sequence[int] = ()) -> torch.Tensor:
    """[C, 3] (tp, fp, fn) per class from integer maps of equal shape.

    Voxels whose label is the ignore label (``num_classes``) are left out; the rows of the
    ``unannotated`` classes are zero (their Dice is NaN: skipped)."""
    label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
    keep = label != num_classes
    if not bool(keep.all()):
        label, pred = label[keep], pred[keep]
    idx = label * num_classes + pred
    cm = torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).double()
    tp = cm.diagonal()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    counts = torch.stack([tp, fp, fn], 1)
    skip = [int(k) for k in unannotated if 0 < int(k) < num_classes]
    if skip:
        counts[skip] = 0
    return counts


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    tp, fp, fn = counts.unbind(1)
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))


def forward_plan(counts_per_rank: list[list[int]]) -> list[list[int]]:
    """Per rank, the ``min_forwards`` to pass for each of its cases so all ranks do max(total).

    Only the last case is padded; a rank with no case gets one dummy entry. Pure function (tested).
    """
    target = max([sum(c) for c in counts_per_rank] + [1])
    plans = []
    for counts in counts_per_rank:
        if not counts:
            plans.append([target])
            continue
        plan = [0] * len(counts)
        plan[-1] = target - sum(counts[:-1])
        plans.append(plan)
    return plans


class Validator:
    def __init__(self, cfg, backend, env, data: DataSource, run_dir: Path, class_names: list[str]):
        self.cfg, self.backend, self.env, self.data = cfg, backend, env, data
        self.run_dir = Path(run_dir)
        self.class_names = class_names
        self.num_classes = cfg.model.num_classes
        v = cfg.validation
        self.mirror_axes = tuple(cfg.augmentation.mirror_axes) if v.mirroring else ()
        # Listed on rank 0 only and broadcast (collective): ranks that listed for themselves could
        # disagree (a transient read error swallowed on one rank), and then their validation
        # collectives would not match and the job would hang.
        cases = self._list_cases() if env.is_main else None
        cases = env.broadcast_object(cases)
        self.cases = cases[: v.max_cases] if v.max_cases else cases
        self._cache: tuple[str, tuple] | None = None
        self._plan: list[int] | None = None  # this rank's min_forwards per case, once computed

    def _list_cases(self) -> list[str]:
        try:
            return list(self.data.validation_case_ids())
        except Exception as e:
            log.warning("no validation cases (%s: %s); validation is off", e.__class__.__name__, e)
            return []

    def _case_shapes(self) -> list[tuple[int, ...]]:
        """Spatial shape of every validation case (rank 0), without reading voxels where the source can."""
        return [tuple(self.data.validation_case_shape(c)) for c in self.cases]

    def my_forward_plan(self) -> list[int]:
        """This rank's ``min_forwards`` per case of its share (collective the first time)."""
        if self._plan is None:
            shapes = None
            if self.env.is_main:
                try:
                    shapes = self._case_shapes()
                except Exception as e:
                    shapes = f"{e.__class__.__name__}: {e}"
            shapes = self.env.broadcast_object(shapes)
            if isinstance(shapes, str):  # every rank fails alike instead of the others waiting for rank 0
                raise RuntimeError(f"validation: reading the validation cases' shapes failed on rank 0 ({shapes})")
            v, patch, world = self.cfg.validation, list(self.cfg.data.patch_size), self.env.world_size
            counts = [count_forwards(shape, patch, v.step_size, self.mirror_axes) for shape in shapes]
            self._plan = forward_plan([counts[r::world] for r in range(world)])[self.env.rank]
        return self._plan

    @property
    def available(self) -> bool:
        return bool(self.cases) and self.cfg.validation.enabled

    def _load(self, case_id: str):
        if self._cache is None or self._cache[0] != case_id:
            self._cache = (case_id, self.data.validation_case(case_id))
        return self._cache[1]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backend.eval_forward(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    # ---- full cases -------------------------------------------------------------------------

    def full(self, step: int) -> dict:
        """Sliding-window Dice on this rank's share of the validation cases (collective)."""
        v, patch = self.cfg.validation, list(self.cfg.data.patch_size)
        mine = self.cases[self.env.rank::self.env.world_size]
        plan = self.my_forward_plan()
        dice_sum = torch.zeros(self.num_classes, dtype=torch.float64)
        dice_n = torch.zeros(self.num_classes, dtype=torch.float64)
        # per class: [hd95 sum, hd95 n (finite), hd95 inf cases, nsd sum, nsd n]
        surface = torch.zeros(self.num_classes, 5, dtype=torch.float64)
        # duck-typed configs without the key (older test stand-ins) keep Dice only
        with_surface = bool(v.surface_metrics)
        preview = None
        self.backend.eval()
        try:
            for case_id, min_forwards in zip(mine, plan):
                image, label, meta = self._load(case_id)
                logits = sliding_window_inference(
                    self._forward, torch.as_tensor(image), patch, step_size=v.step_size,
                    mirror_axes=self.mirror_axes, device=self.backend.device, out_device="cpu",
                    min_forwards=min_forwards,
                )
                pred = logits.argmax(0)
                d = dice_from_counts(confusion_counts(torch.as_tensor(label), pred, self.num_classes,
                                                      _unannotated(meta)))
                ok = ~torch.isnan(d)
                dice_sum[ok] += d[ok]
                dice_n[ok] += 1
                if with_surface:
                    surface += self._surface_sums(np.asarray(label), pred.numpy(), _unannotated(meta))
                if preview is None:
                    preview = (case_id, np.asarray(image[0]), np.asarray(label), pred.numpy())
            if not mine:  # nothing to validate here, but the sharded model still needs our forwards
                dummy = torch.zeros(self.cfg.model.in_channels, *patch)
                sliding_window_inference(self._forward, dummy, patch, step_size=v.step_size,
                                         device=self.backend.device, out_device="cpu", min_forwards=plan[0])
        finally:
            self.backend.after_eval()
            self.backend.train()
        # one all-reduce for everything (its length is the same on every rank, surface or not)
        totals = self.env.all_reduce(dice_sum.tolist() + dice_n.tolist() + surface.flatten().tolist(), "sum")
        c = self.num_classes
        per_class = [totals[i] / totals[c + i] if totals[c + i] > 0 else math.nan for i in range(c)]
        fg = [x for x in per_class[1:] if not math.isnan(x)]
        result = {
            "mean_dice": float(np.mean(fg)) if fg else math.nan,
            "per_class": {self.class_names[i]: per_class[i] for i in range(1, c)},
            "cases": len(self.cases),
        }
        if with_surface:
            s = np.asarray(totals[2 * c:], dtype=np.float64).reshape(c, 5)
            hd = {self.class_names[i]: s[i, 0] / s[i, 1] if s[i, 1] > 0 else math.nan for i in range(1, c)}
            nsd = {self.class_names[i]: s[i, 3] / s[i, 4] if s[i, 4] > 0 else math.nan for i in range(1, c)}
            result.update({
                "mean_hd95": _mean_present(hd.values()), "mean_nsd": _mean_present(nsd.values()),
                "per_class_hd95": hd, "per_class_nsd": nsd,
                "hd95_infinite": {self.class_names[i]: int(s[i, 2]) for i in range(1, c) if s[i, 2]},
                "nsd_tolerance_mm": float(v.nsd_tolerance_mm),
            })
        if self.env.is_main and preview is not None:
            result["preview"] = preview
        return result

    def _surface_sums(self, label: np.ndarray, pred: np.ndarray, unannotated: Sequence[int]) -> torch.Tensor:
        """[C, 5] sums of one case: hd95 (finite) and its count, one-sided misses, nsd and its count."""
        out = torch.zeros(self.num_classes, 5, dtype=torch.float64)
        classes = list(range(1, self.num_classes))
        got = label_map_metrics(pred, label, classes, [float(x) for x in self.cfg.data.spacing],
                                self.cfg.validation.nsd_tolerance_mm, skip=unannotated,
                                ignore_label=self.num_classes)
        for k, m in got.items():
            if math.isfinite(m["hd95"]):
                out[k, 0], out[k, 1] = m["hd95"], 1
            elif math.isinf(m["hd95"]):
                out[k, 2] = 1
            if not math.isnan(m["nsd"]):
                out[k, 3], out[k, 4] = m["nsd"], 1
        return out

    # ---- pseudo-Dice on patches -------------------------------------------------------------

    def pseudo_dice(self, epoch: int) -> dict:
        """nnU-Net's per-epoch estimate on a few patches (same number of forwards on every rank)."""
        patch = list(self.cfg.data.patch_size)
        counts = torch.zeros(self.num_classes, 3, dtype=torch.float64)
        rng = np.random.default_rng([self.cfg.seed, epoch, self.env.rank])
        self.backend.eval()
        try:
            for b in range(self.cfg.validation.pseudo_dice_batches):
                case_id = self.cases[int(rng.integers(len(self.cases)))]
                image, label, meta = self._load(case_id)
                img, lab = _crop(np.asarray(image), np.asarray(label), patch, rng, foreground=b % 2 == 1,
                                 ignore_label=self.num_classes)
                logits = self._forward(torch.from_numpy(img)[None].float())
                pred = logits.float().argmax(1)[0].cpu()
                counts += confusion_counts(torch.from_numpy(lab), pred, self.num_classes, _unannotated(meta))
        finally:
            self.backend.after_eval()
            self.backend.train()
        total = torch.tensor(self.env.all_reduce(counts.flatten().tolist(), "sum"), dtype=torch.float64).reshape(-1, 3)
        d = dice_from_counts(total)[1:]
        present = d[~torch.isnan(d)]
        return {"mean_dice": float(present.mean()) if len(present) else math.nan}


def _mean_present(values) -> float:
    present = [float(x) for x in values if not math.isnan(x)]
    return float(np.mean(present)) if present else math.nan


def _unannotated(meta) -> list[int]:
    """A validation case's unannotated classes (manifest ``missing_classes``; none when unknown)."""
    return list((meta or {}).get("missing_classes") or []) if isinstance(meta, dict) else []


def _crop(image: np.ndarray, label: np.ndarray, patch: list[int], rng, foreground: bool,
          ignore_label: int | None = None):
    """A patch (padded with the image minimum where the case is smaller), random or on foreground
    (a class voxel: the ignore label is not foreground here)."""
    shape = label.shape
    pads = [(max(0, (p - s + 1) // 2), max(0, p - s - (p - s + 1) // 2)) for p, s in zip(patch, shape)]
    if any(a or b for a, b in pads):
        image = np.pad(image, [(0, 0)] + pads, constant_values=float(image.min()))
        label = np.pad(label, pads)
        shape = label.shape
    fg_mask = (label > 0) if ignore_label is None else (label > 0) & (label != ignore_label)
    if foreground and fg_mask.any():
        fg = np.argwhere(fg_mask)
        centre = fg[int(rng.integers(len(fg)))]
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, shape)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, shape)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
    return np.ascontiguousarray(image[(slice(None), *sl)]), np.ascontiguousarray(label[sl])
