"""Label maps for direct inference on another dataset's label set (``predict --label-map``).

STU-Net's paper scores the pretrained model directly on other datasets by mapping its
TotalSegmentator classes onto theirs. A label map is a JSON file:

    {"name": "AMOS22",
     "source_classes": "totalsegmentator_v1",          # what the "from" names are checked against
     "target_reference": "where the target ids/names come from",
     "labels": {"1": {"name": "spleen", "from": ["spleen"]},
                "2": {"name": "kidney", "from": ["kidney_left", "kidney_right"]},   # merged
                ...},
     "unmapped": {"15": {"name": "prostate/uterus", "reason": "no TotalSegmentator v1 class"}}}

Each target id (> 0) gets the voxels of every source class in its ``from`` list (several sources
merge, e.g. left + right kidney -> kidney); source classes in no list become background (0).
Targets without any source are never silent: they go in ``unmapped`` with a reason, and a target in
``labels`` with an empty ``from`` is an error. Shipped maps (``SHIPPED``; files
``stunet_scale/data/class_maps/label_map_*.json``) use TotalSegmentator v1 names as sources, the
classes the released STU-Net models predict, and the target datasets' own ids and names:

* ``btcv``: BTCV / Synapse 13 organs (Synapse wiki label list, as in nnU-Net's Task017 dataset.json);
  every target has a v1 source (``portal vein and splenic vein`` is a v1 class too); nothing unmapped.
* ``amos22``: AMOS22's 15 organs (its dataset.json, names verbatim incl. ``arota``/``postcava``);
  ``prostate/uterus`` (15) has no v1 class and is listed as unmapped.
* ``flare22``: FLARE22's 13 organs (challenge label list); nothing unmapped.

Errors (``LabelMapError``) name the map file and the offending name: a source name the source class
list does not know (with close matches), a target mapped from nothing, a source used by two targets,
duplicate target ids or names, and at prediction time a source class the model does not predict.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_DIR = Path(__file__).parent / "data" / "class_maps"

#: shipped map name -> file in stunet_scale/data/class_maps/
SHIPPED = {
    "btcv": "label_map_btcv.json",
    "amos22": "label_map_amos22.json",
    "flare22": "label_map_flare22.json",
}

# source class lists a map may name (files of stunet_scale/data/class_maps/, {"id": name})
_SOURCE_LISTS = {"totalsegmentator_v1": "totalsegmentator_v1.json", "totalsegmentator_v2": "totalsegmentator_v2.json"}


class LabelMapError(ValueError):
    """A label map that cannot be used (file, names, ids), or one the model cannot serve."""


@dataclass(frozen=True)
class LabelMap:
    """A validated label map: target id -> (name, source names); unmapped targets with reasons."""

    path: str
    name: str
    targets: dict[int, tuple[str, tuple[str, ...]]]
    unmapped: dict[int, dict] = field(default_factory=dict)
    source_classes: str = "totalsegmentator_v1"
    target_reference: str = ""

    def lookup_table(self, model_labels: list[str]) -> np.ndarray:
        """``table[model value] = target id`` for a model whose value k means ``model_labels[k]``.

        Every source name must be one of the model's labels (else ``LabelMapError``: a model trained
        on fewer classes cannot serve this map)."""
        index = {n: k for k, n in enumerate(model_labels)}
        missing = [s for _, srcs in self.targets.values() for s in srcs if s not in index]
        if missing:
            raise LabelMapError(f"label map {self.path}: the model does not predict {missing[:8]} (its labels: "
                                f"{len(model_labels)} classes, e.g. {model_labels[1:6]}); use a model trained on "
                                f"the map's {self.source_classes} classes or edit the map")
        table = np.zeros(len(model_labels), dtype=np.int64)
        for target, (_, sources) in self.targets.items():
            for s in sources:
                table[index[s]] = target
        return table

    def apply(self, labels: np.ndarray, table: np.ndarray) -> np.ndarray:
        """The model's label array mapped to target ids (merged sources share their target's id)."""
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= len(table)):
            raise LabelMapError(f"label map {self.path}: label values {int(labels.min())}..{int(labels.max())} "
                                f"outside the model's 0..{len(table) - 1}")
        out = table[labels]
        top = max(self.targets, default=0)
        return out.astype(np.uint8 if top <= 255 else np.uint16, copy=False)

    def labels_json(self, checkpoint: str, **extra) -> dict:
        """What predict writes beside mapped output: target value -> name (as ``evaluate`` reads it)."""
        labels = {"0": "background", **{str(k): n for k, (n, _) in sorted(self.targets.items())}}
        return {"labels": labels, "label_map": self.path, "label_map_name": self.name,
                "sources": {n: list(s) for _, (n, s) in sorted(self.targets.items())},
                "unmapped": {str(k): v for k, v in sorted(self.unmapped.items())},
                "target_reference": self.target_reference, "model": str(checkpoint), **extra,
                "note": "label values are the target dataset's ids; unmapped targets never occur in the output"}


def shipped_path(name: str) -> Path:
    return _DIR / SHIPPED[name]


def _source_names(kind: str, where: str) -> set[str]:
    if kind not in _SOURCE_LISTS:
        raise LabelMapError(f"label map {where}: source_classes {kind!r} is not one of {sorted(_SOURCE_LISTS)}")
    names = json.loads((_DIR / _SOURCE_LISTS[kind]).read_text())
    return {n for k, n in names.items() if k != "0"}


def _target_id(key, where: str, section: str) -> int:
    try:
        k = int(key)
    except (TypeError, ValueError):
        k = -1
    if k <= 0 or str(k) != str(key):
        raise LabelMapError(f"label map {where}: {section} key {key!r} is not a label id > 0 (\"1\", \"2\", ...)")
    return k


def load_label_map(spec: str | Path) -> LabelMap:
    """A shipped map by name (``btcv``, ``amos22``, ``flare22``) or a JSON file, validated."""
    spec = str(spec)
    path = shipped_path(spec) if spec in SHIPPED else Path(spec)
    where = str(path)
    if not path.is_file():
        raise LabelMapError(f"label map {spec}: neither a shipped map ({', '.join(SHIPPED)}) nor an existing JSON file")
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LabelMapError(f"label map {where}: not readable JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("labels"), dict) or not obj["labels"]:
        raise LabelMapError(f"label map {where}: needs \"labels\": {{\"1\": {{\"name\": ..., \"from\": [...]}}, ...}}")
    kind = obj.get("source_classes", "totalsegmentator_v1")
    known = _source_names(kind, where)
    targets: dict[int, tuple[str, tuple[str, ...]]] = {}
    used: dict[str, str] = {}
    for key, entry in obj["labels"].items():
        k = _target_id(key, where, "labels")
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise LabelMapError(f"label map {where}: labels[{key!r}] needs a \"name\" and a \"from\" list")
        name, sources = entry["name"], entry.get("from")
        if not isinstance(sources, list) or not sources:
            raise LabelMapError(f"label map {where}: target {name!r} ({key}) is mapped from nothing; give it source "
                                f"classes in \"from\" or move it to \"unmapped\" with a reason")
        for s in sources:
            if not isinstance(s, str) or s not in known:
                close = difflib.get_close_matches(str(s), sorted(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise LabelMapError(f"label map {where}: target {name!r} names unknown source class {s!r} (not a "
                                    f"{kind} class){hint}")
            if s in used:
                raise LabelMapError(f"label map {where}: source class {s!r} is mapped to both {used[s]!r} and "
                                    f"{name!r}; a source voxel can have one target")
            used[s] = name
        targets[k] = (name, tuple(sources))
    names = [n for n, _ in targets.values()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LabelMapError(f"label map {where}: target name(s) {dup} used for more than one id")
    unmapped = {}
    for key, entry in (obj.get("unmapped") or {}).items():
        k = _target_id(key, where, "unmapped")
        if k in targets:
            raise LabelMapError(f"label map {where}: id {k} is both in labels and in unmapped")
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("reason"):
            raise LabelMapError(f"label map {where}: unmapped[{key!r}] needs a \"name\" and a \"reason\"")
        unmapped[k] = {"name": str(entry["name"]), "reason": str(entry["reason"])}
    return LabelMap(where, str(obj.get("name", path.stem)), dict(sorted(targets.items())), unmapped, kind,
                    str(obj.get("target_reference", "")))
