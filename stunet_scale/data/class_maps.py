"""Label maps: TotalSegmentator v1 (104 classes), v2 (117) and STU-Net's head order (105 with background).

The JSON files beside this module are verbatim copies of TotalSegmentator's
``map_to_binary.class_map["total_v1"]`` / ``["total"]`` and STU-Net's ``label_orders.json``.
STU-Net's order is *not* TotalSegmentator's: it is background followed by the v1 names sorted
with Python's ``sorted()`` (1 = adrenal_gland_left, 104 = vertebrae_T9). Released STU-Net heads
use that order, so channel k of a released checkpoint means ``load_class_map("stunet").labels[k]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_DIR = Path(__file__).with_name("class_maps")

# name -> (file, TotalSegmentator version the names come from, one-line description)
CLASS_MAP_FILES = {
    "totalseg-v1": ("totalsegmentator_v1.json", "v1", "TotalSegmentator v1, official ids (1 = spleen)"),
    "totalseg-v2": ("totalsegmentator_v2.json", "v2", "TotalSegmentator v2.0.1, official ids (1 = spleen)"),
    "stunet": ("stunet_label_orders.json", "v1", "STU-Net head order: background + sorted v1 names"),
}


@dataclass(frozen=True)
class ClassMap:
    name: str
    totalseg_version: str
    description: str
    labels: tuple[str, ...]  # labels[0] == "background"; labels[k] is the name of label value k

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

    def index(self, name: str) -> int:
        try:
            return self.labels.index(name)
        except ValueError:
            raise KeyError(f"class {name!r} is not in class map {self.name!r}") from None

    def as_dict(self) -> dict[str, str]:
        return {str(i): n for i, n in enumerate(self.labels)}


@lru_cache(maxsize=None)
def load_class_map(name: str) -> ClassMap:
    if name not in CLASS_MAP_FILES:
        raise KeyError(f"unknown class map {name!r}; known: {', '.join(CLASS_MAP_FILES)}")
    file, version, description = CLASS_MAP_FILES[name]
    raw = json.loads((_DIR / file).read_text())
    ids = sorted(int(k) for k in raw)
    if ids != list(range(len(ids))) or raw["0"] != "background":
        raise ValueError(f"{file}: label ids must be 0..N with 0 = background")
    return ClassMap(name=name, totalseg_version=version, description=description, labels=tuple(raw[str(i)] for i in ids))


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
