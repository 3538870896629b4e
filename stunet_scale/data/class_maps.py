"""Label maps: TotalSegmentator v1 (104 classes), v2 (117) and STU-Net's head order (105 with background).

The JSON files beside this module are verbatim copies of TotalSegmentator's
``map_to_binary.class_map["total_v1"]`` / ``["total"]`` and STU-Net's ``label_orders.json``.
STU-Net's order is *not* TotalSegmentator's: it is background followed by the v1 names sorted
with Python's ``sorted()`` (1 = adrenal_gland_left, 104 = vertebrae_T9). Released STU-Net heads
use that order, so channel k of a released checkpoint means ``load_class_map("stunet").labels[k]``.

Preparing data of one TotalSegmentator release for a map of the other (v2 data for STU-Net's v1
head, the common case) follows ``TOTALSEG_V1_ONLY`` / ``TOTALSEG_V2_ONLY`` below, and never teaches
"this organ is background" (``source_correspondence``):

* a source class with a target class of the same name is mapped to it (97 of the names: TotalSegmentator
  renamed nothing in the ``total`` task between v1 and v2);
* a source class with no target class (v2 ``heart``, which covers v1's five heart classes; v2's new
  classes such as ``vertebrae_S1`` or ``kidney_cyst_left``, whose voxels v1 may have counted in a
  neighbour) gets the *ignore label*: the value ``len(labels)``, one above the last class, as nnU-Net
  v2's ignore label. The loss and the validation Dice skip those voxels;
* a target class no source file provides (v1 ``heart_atrium_left`` from v2 data) is *unannotated*
  for the case (``missing_classes`` in the manifest): the loss marginalises it into background and
  validation skips it, so predicting it is never penalised.

A *subset* map (``totalseg-major``: 24 large structures under their TotalSegmentator names) is a
deliberate choice of classes, not another release: every other TotalSegmentator class of either
release is background for it (its mask file is not even read), except a release-only class whose
note above names a class of the subset (v2 ``kidney_cyst_left`` with ``kidney_left``): that one
stays ignored, because v1 may count its voxels in the subset class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_DIR = Path(__file__).with_name("class_maps")

# name -> (file, TotalSegmentator version the names come from, one-line description)
CLASS_MAP_FILES = {
    "totalseg-v1": ("totalsegmentator_v1.json", "v1", "TotalSegmentator v1, official ids (1 = spleen)"),
    "totalseg-v2": ("totalsegmentator_v2.json", "v2", "TotalSegmentator v2.0.1, official ids (1 = spleen)"),
    "stunet": ("stunet_label_orders.json", "v1", "STU-Net head order: background + sorted v1 names"),
    "totalseg-major": ("totalseg_major.json", "v2", "24 large TotalSegmentator structures (names as v1 and v2, v2 "
                       "order); every other class is background: demos and quick studies"),
}
# Maps that choose some TotalSegmentator classes; the other classes of both releases are background.
SUBSET_MAPS = frozenset({"totalseg-major"})


# TotalSegmentator's own account of the v1 -> v2 change of the ``total`` task
# (resources/improvements_in_v2.md, v2.0): six classes moved to the ``heartchambers_highres`` task and
# ``face`` to the ``face`` task, one overall ``heart`` class and 19 new classes were added, and
# "everything else should be identical" (same name, same structure). tests/test_class_map_fidelity.py
# checks these two tables against the JSON files, so they cannot drift from the shipped maps.
TOTALSEG_V1_ONLY = {
    "heart_myocardium": "v2 total has only the overall class heart (chambers: v2 task heartchambers_highres)",
    "heart_atrium_left": "v2 total has only the overall class heart (chambers: v2 task heartchambers_highres)",
    "heart_ventricle_left": "v2 total has only the overall class heart (chambers: v2 task heartchambers_highres)",
    "heart_atrium_right": "v2 total has only the overall class heart (chambers: v2 task heartchambers_highres)",
    "heart_ventricle_right": "v2 total has only the overall class heart (chambers: v2 task heartchambers_highres)",
    "pulmonary_artery": "moved to v2 task heartchambers_highres; its voxels are background (or heart) in v2 total",
    "face": "moved to v2 task face; its voxels are background (or skull) in v2 total",
}
TOTALSEG_V2_ONLY = {
    "heart": "covers v1 heart_myocardium + the four v1 chambers (a many-to-one merge: no single v1 class)",
    "atrial_appendage_left": "part of v1 heart_atrium_left, which v2 data does not annotate",
    "pulmonary_vein": "new in v2; v1 had no class (background or part of the heart)",
    "superior_vena_cava": "new in v2; v1 had no class (background or part of the heart)",
    "brachiocephalic_trunk": "new in v2; background in v1",
    "subclavian_artery_right": "new in v2; background in v1",
    "subclavian_artery_left": "new in v2; background in v1",
    "common_carotid_artery_right": "new in v2; background in v1",
    "common_carotid_artery_left": "new in v2; background in v1",
    "brachiocephalic_vein_left": "new in v2; background in v1",
    "brachiocephalic_vein_right": "new in v2; background in v1",
    "vertebrae_S1": "new in v2; v1 may count it in sacrum",
    "kidney_cyst_left": "new in v2; v1 may count cysts in kidney_left",
    "kidney_cyst_right": "new in v2; v1 may count cysts in kidney_right",
    "skull": "new in v2; background (or face) in v1",
    "thyroid_gland": "new in v2; background in v1",
    "prostate": "new in v2; background in v1",
    "sternum": "new in v2; background in v1",
    "costal_cartilages": "new in v2; background in v1",
    "spinal_cord": "new in v2; background in v1",
}


@dataclass(frozen=True)
class ClassMap:
    name: str
    totalseg_version: str
    description: str
    labels: tuple[str, ...]  # labels[0] == "background"; labels[k] is the name of label value k
    others_background: bool = False  # a subset map: TotalSegmentator classes not in it are background

    @property
    def num_foreground(self) -> int:
        return len(self.labels) - 1

    @property
    def num_outputs(self) -> int:
        """Network output channels (background included)."""
        return len(self.labels)

    @property
    def foreground(self) -> tuple[str, ...]:
        return self.labels[1:]

    @property
    def ignore_label(self) -> int:
        """nnU-Net v2's ignore label: the value after the last class (never a network output)."""
        return len(self.labels)

    def index(self, name: str) -> int:
        try:
            return self.labels.index(name)
        except ValueError:
            raise KeyError(f"class {name!r} is not in class map {self.name!r}") from None

    def as_dict(self) -> dict[str, str]:
        return {str(i): n for i, n in enumerate(self.labels)}


@cache
def load_class_map(name: str) -> ClassMap:
    if name not in CLASS_MAP_FILES:
        raise KeyError(f"unknown class map {name!r}; known: {', '.join(CLASS_MAP_FILES)}")
    file, version, description = CLASS_MAP_FILES[name]
    raw = json.loads((_DIR / file).read_text())
    ids = sorted(int(k) for k in raw)
    if ids != list(range(len(ids))) or raw["0"] != "background":
        raise ValueError(f"{file}: label ids must be 0..N with 0 = background")
    return ClassMap(name=name, totalseg_version=version, description=description, labels=tuple(raw[str(i)] for i in ids),
                    others_background=name in SUBSET_MAPS)


def detect_class_map(mask_names: Iterable[str]) -> str:
    """Pick the TotalSegmentator map whose class names best explain a case's mask files.

    Returns "totalseg-v2" or "totalseg-v1" (the official order of that release); STU-Net's
    order is a choice of the user, never guessed. Raises when neither fits most names.
    """
    names = set(mask_names)
    if not names:
        raise ValueError("no mask files to detect the class map from")
    best, best_score = None, -1.0
    for candidate in ("totalseg-v2", "totalseg-v1"):
        known = set(load_class_map(candidate).foreground)
        unknown = len(names - known)
        covered = len(names & known) / len(known)
        score = covered - unknown / len(names)
        if score > best_score:
            best, best_score = candidate, score
    known = set(load_class_map(best).foreground)
    stray = sorted(names - known)
    if len(stray) > 0.1 * len(names):
        raise ValueError(
            f"mask names do not match TotalSegmentator v1 or v2 (e.g. {stray[:5]}); pass --classes explicitly"
        )
    return best


@dataclass(frozen=True)
class Correspondence:
    """How the classes of a dataset's masks land in a target class map (``source_correspondence``)."""

    mapped: dict[str, str]  # source name -> target class of the same name
    to_ignore: dict[str, str]  # source name -> why its voxels get the ignore label
    to_background: dict[str, str]  # source name -> why its voxels are background (subset maps only)
    unannotated: dict[str, str]  # target class -> why no source provides it


def source_correspondence(source_names: Iterable[str], target: str) -> Correspondence:
    """Map a dataset's class names (TotalSegmentator mask files, dataset.json labels) onto ``target``.

    A name of ``target`` is mapped to itself. Any other name gets the ignore label: the
    TotalSegmentator tables above give the reason, and a name they do not know (another task's
    mask file, a user's extra label) is ignored too, because "no target class" says nothing about
    whether its voxels are background in the target's sense. A target class no source name provides
    is unannotated. Background is neither a source nor a target class here. For a subset map, the
    other TotalSegmentator classes are background (module docstring).
    """
    cmap = load_class_map(target)
    known = set(cmap.foreground)
    names = [n for n in dict.fromkeys(source_names) if n != "background"]
    mapped = {n: n for n in names if n in known}
    to_background = {}
    if cmap.others_background:
        totalseg = set(load_class_map("totalseg-v1").foreground) | set(load_class_map("totalseg-v2").foreground)
        for n in names:
            note = _release_only(n, "v1") or _release_only(n, "v2") or ""
            if n in totalseg and n not in known and not set(re.findall(r"\w+", note)) & known:
                to_background[n] = f"a TotalSegmentator class outside subset map {target!r}"
    v = cmap.totalseg_version
    other = {"v1": "v2", "v2": "v1"}.get(v)
    to_ignore = {n: _release_only(n, other) or _release_only(n, v) or f"not a class of map {target!r}"
                 for n in names if n not in known and n not in to_background}
    unannotated = {n: _release_only(n, v) or "no mask file / label of this name in the dataset"
                   for n in cmap.foreground if n not in mapped}
    return Correspondence(mapped=mapped, to_ignore=to_ignore, to_background=to_background, unannotated=unannotated)


def _release_only(name: str, version: str | None) -> str | None:
    """Why ``name`` exists only in TotalSegmentator ``version`` ("v1"/"v2"), or None."""
    table = {"v1": TOTALSEG_V1_ONLY, "v2": TOTALSEG_V2_ONLY}.get(version or "", {})
    return f"TotalSegmentator {version} only: {table[name]}" if name in table else None
