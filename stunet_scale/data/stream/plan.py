"""The sample plan: every training sample is a pure function of ``(seed, global_sample_index)``.

Global sample ``g = step * global_batch + position``. From ``(seed, g)`` alone come the case, whether
the sample is forced to contain foreground, the class, the voxel, the patch position and every
augmentation parameter. There is no iterator state, so:

- resuming needs only ``(seed, step)``: the next sample is ``plan.sample(step * global_batch)``;
- DataLoader workers and prefetching cannot change what a sample is (``num_workers`` 0 or 8 give the
  same tensors), because a worker is handed indices, not a share of a random stream;
- the world size can change with the global batch constant (elastic): rank ``r`` of ``W`` takes
  positions ``r, r + W, r + 2W, ...`` of each global batch, so the *set* of samples of a step is the
  same at any ``W``; only who computes which one changes.

Randomness is counter-based: ``Philox4x64`` keyed by ``(seed, g)`` with the purpose (case,
foreground, position, augmentation, noise key) in the counter's top word, so purposes are
independent streams and adding an augmentation never moves a case or a patch.

Foreground oversampling follows nnU-Net: position ``j`` of a batch of ``b`` is forced iff
``not j < round(b * (1 - p))``. Here ``b`` is the GLOBAL batch and ``j`` the position in it (as
nnU-Net's DDP trainer does), so the forced share is ``(b - round(b (1 - p))) / b`` of the global
batch whatever the world size or micro-batch: 1 of 2 (50 %) at the paper's batch 2, 3 of 8
(37.5 %), 5 of 16 (31 %), tending to ``p`` for large batches. A forced sample picks a class
uniformly among those present in its case, then one of that class's stored voxels (``fg_locations``),
and centres the initial patch on it; a case without foreground falls back to a random position.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_MASK64 = (1 << 64) - 1

# Counter streams (top word of the Philox counter): independent purposes of one sample.
STREAM_CASE = 0
STREAM_FOREGROUND = 1
STREAM_POSITION = 2
STREAM_AUGMENT = 3
STREAM_NOISE = 4
STREAM_WDS = 5


def counter_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """A fresh generator for one (seed, sample, purpose): Philox keyed by (seed, index)."""
    key = np.array([int(seed) & _MASK64, int(index) & _MASK64], dtype=np.uint64)
    counter = np.array([0, 0, 0, int(stream) & _MASK64], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


@dataclass(frozen=True)
class PlanCase:
    """What the plan needs to know about one training case (from the store's manifest/attrs)."""

    case_id: str
    shape: tuple[int, int, int]
    split: str = "train"
    fg_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # present classes (> 0)
    fg_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # first row in fg_locations
    fg_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows of that class


@dataclass
class SampleSpec:
    """One planned sample. ``origin`` is the initial patch's lower corner in volume voxels, once resolved."""

    index: int
    case: int
    case_id: str
    forced_fg: bool
    fg_label: int  # -1: none
    fg_row: int  # row in the case's fg_locations; -1: random position
    random_origin: tuple[int, int, int]
    aug: dict = field(repr=False, default_factory=dict)

    @property
    def spatial(self) -> bool:
        return bool(self.aug.get("spatial", False))


def forced_foreground(position: int, global_batch: int, fraction: float) -> bool:
    """nnU-Net's ``_oversample_last_XX_percent`` on the position in the global batch."""
    return not position < round(global_batch * (1 - fraction))


def origin_bounds(shape: Sequence[int], patch: Sequence[int], initial: Sequence[int]) -> tuple[list[int], list[int]]:
    """nnU-Net's ``get_bbox`` bounds for the initial patch's lower corner (inclusive).

    The volume is padded by ``initial - patch`` (more if it is smaller than the initial patch), split
    as nnU-Net does, so the final patch stays inside the volume wherever the volume is large enough.
    """
    lbs, ubs = [], []
    for s, p, i in zip(shape, patch, initial):
        need = i - p
        if need + s < i:
            need = i - s
        lbs.append((-need) // 2)
        ubs.append(s + need // 2 + need % 2 - i)
    return lbs, ubs


def resolve_origin(spec: SampleSpec, shape: Sequence[int], initial: Sequence[int], patch: Sequence[int],
                   fg_voxel: Sequence[int] | None) -> list[int]:
    """The initial patch's lower corner: centred on the foreground voxel (nnU-Net), else the random draw."""
    if spec.fg_row < 0 or fg_voxel is None:
        return list(spec.random_origin)
    lbs, _ = origin_bounds(shape, patch, initial)
    return [max(lb, int(v) - i // 2) for lb, v, i in zip(lbs, fg_voxel, initial)]


def _case_weights(cases: Sequence[PlanCase], mode: str, train_splits: Sequence[str],
                  split_weights: Sequence[float]) -> np.ndarray:
    n = len(cases)
    if mode == "uniform":
        return np.full(n, 1.0 / n)
    if mode == "split":
        shares = list(split_weights) if split_weights else [1.0] * len(train_splits)
        share = dict(zip(train_splits, shares))
        counts: dict[str, int] = {}
        for c in cases:
            counts[c.split] = counts.get(c.split, 0) + 1
        w = np.array([share.get(c.split, 0.0) / counts[c.split] for c in cases])
    elif mode == "class_rarity":
        # Each class present in the training set gets the same total weight, spread evenly over the
        # cases containing it: drawing a case = drawing a class uniformly, then a case that has it.
        # A case without any foreground is never drawn in this mode.
        n_with: dict[int, int] = {}
        for c in cases:
            for lab in c.fg_labels.tolist():
                n_with[lab] = n_with.get(lab, 0) + 1
        w = np.array([sum(1.0 / n_with[lab] for lab in c.fg_labels.tolist()) for c in cases])
    else:
        raise ValueError(f"data.case_weighting={mode!r} is not uniform, split or class_rarity")
    if w.sum() <= 0:
        raise ValueError(f"data.case_weighting={mode!r} gives every training case weight 0")
    return w / w.sum()


def rank_positions(global_batch: int, rank: int, world_size: int) -> list[int]:
    """Positions of the global batch that rank ``rank`` computes: r, r + W, ..."""
    if global_batch % world_size:
        raise ValueError(f"schedule.global_batch={global_batch} is not divisible by {world_size} ranks")
    return list(range(rank, global_batch, world_size))


def micro_batch_indices(global_batch: int, step: int, rank: int, world_size: int, micro: int, micro_batch: int) -> list[int]:
    """Global sample indices of micro-batch ``micro`` (0-based) of ``rank`` at ``step``. Every data
    source (the store's, the tests' stand-ins) takes its samples by this rule."""
    pos = rank_positions(global_batch, rank, world_size)[micro * micro_batch:(micro + 1) * micro_batch]
    return [step * global_batch + p for p in pos]


class SamplePlan:
    """Maps a global sample index to a ``SampleSpec``; the same at every rank, worker and restart.

    ``cases`` must be in a canonical order (sorted case ids); the plan's ``fingerprint`` changes when
    the case list, its shapes, foreground tables or any sampling setting change. The trainer should
    store it with each checkpoint and compare it on resume: a resume from ``(seed, step)`` replays
    the same samples only against the same plan.
    """

    def __init__(self, cases: Sequence[PlanCase], *, seed: int, global_batch: int, patch: Sequence[int],
                 initial: Sequence[int], oversample_foreground: float = 0.33, aug_cfg=None, channels: int = 1,
                 case_weighting: str = "uniform", train_splits: Sequence[str] = ("train",),
                 split_weights: Sequence[float] = ()):
        if not cases:
            raise ValueError("the sample plan needs at least one training case")
        self.cases = list(cases)
        self.seed = int(seed)
        self.global_batch = int(global_batch)
        self.patch = [int(p) for p in patch]
        self.initial = [int(i) for i in initial]
        self.oversample_foreground = float(oversample_foreground)
        self.aug_cfg = aug_cfg
        self.channels = int(channels)
        self.case_weighting = case_weighting
        self.weights = _case_weights(self.cases, case_weighting, train_splits, split_weights)
        self._cdf = np.cumsum(self.weights)
        self._cdf[-1] = 1.0
        self._bounds = [origin_bounds(c.shape, self.patch, self.initial) for c in self.cases]
        self.case_index = {c.case_id: i for i, c in enumerate(self.cases)}

    # -- indexing -----------------------------------------------------------------------------

    def global_indices(self, step: int) -> list[int]:
        return [step * self.global_batch + j for j in range(self.global_batch)]

    def rank_positions(self, rank: int, world_size: int) -> list[int]:
        return rank_positions(self.global_batch, rank, world_size)

    def micro_batch_indices(self, step: int, rank: int, world_size: int, micro: int, micro_batch: int) -> list[int]:
        return micro_batch_indices(self.global_batch, step, rank, world_size, micro, micro_batch)

    # -- the plan itself ------------------------------------------------------------------------

    def sample(self, index: int, case: int | None = None) -> SampleSpec:
        """The sample at global index ``index``. ``case`` overrides the plan's case choice (the
        WebDataset reader draws cases from its stream); everything else stays keyed by the index."""
        index = int(index)
        position = index % self.global_batch
        if case is None:
            u_case = counter_rng(self.seed, index, STREAM_CASE).random()
            ci = int(min(np.searchsorted(self._cdf, u_case, side="right"), len(self.cases) - 1))
        else:
            ci = int(case)
        case = self.cases[ci]
        forced = forced_foreground(position, self.global_batch, self.oversample_foreground)
        fg_label, fg_row = -1, -1
        if forced and len(case.fg_labels):
            u = counter_rng(self.seed, index, STREAM_FOREGROUND).random(2)
            k = min(int(u[0] * len(case.fg_labels)), len(case.fg_labels) - 1)
            count = int(case.fg_counts[k])
            if count > 0:
                fg_label = int(case.fg_labels[k])
                fg_row = int(case.fg_starts[k]) + min(int(u[1] * count), count - 1)
        lbs, ubs = self._bounds[ci]
        u = counter_rng(self.seed, index, STREAM_POSITION).random(3)
        origin = tuple(lb + min(int(x * (ub - lb + 1)), ub - lb) for lb, ub, x in zip(lbs, ubs, u))
        if self.aug_cfg is None:
            aug = identity_params(self.channels)
        else:
            aug = draw_params(counter_rng(self.seed, index, STREAM_AUGMENT), self.aug_cfg, self.channels)
        return SampleSpec(index=index, case=ci, case_id=case.case_id, forced_fg=forced, fg_label=fg_label,
                          fg_row=fg_row, random_origin=origin, aug=aug)

    def noise_key(self, index: int) -> int:
        """The sample's 32-bit noise key. The field itself is generated where the batch is augmented
        (``counter_noise.add_gaussian_noise_``), as a pure function of this key and the voxel index, so every
        device computes the same field and none of it travels from the workers."""
        return int(counter_rng(self.seed, index, STREAM_NOISE).integers(0, 1 << 32))

    def noise_field(self, index: int, shape: Sequence[int]) -> np.ndarray:
        """The sample's unit Gaussian noise field, float32, as the augmentation adds it (inspection, tests)."""
        from .counter_noise import gaussian_noise

        return gaussian_noise(self.noise_key(index), shape).numpy()

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying what ``sample(i)`` returns for every ``i``: seed, batch, patch sizes,
        foreground oversampling, case weighting, channels, every augmentation setting, and per case
        its id, shape, split and foreground table (labels, row starts and counts).

        Public API for checkpoints (also ``TrainStream.fingerprint``): store it at save time; a
        different value at resume means the store or the sampling settings changed, so the resumed
        run would not continue the interrupted sample sequence.
        """
        h = hashlib.sha256()
        h.update(repr((self.seed, self.global_batch, self.patch, self.initial, self.oversample_foreground,
                       self.case_weighting, self.channels)).encode())
        if self.aug_cfg is not None:
            h.update(repr(sorted(dataclasses.asdict(self.aug_cfg).items())).encode())
        for c in self.cases:
            h.update(repr((c.case_id, tuple(c.shape), c.split)).encode())
            h.update(np.ascontiguousarray(c.fg_labels, np.int64).tobytes())
            h.update(np.ascontiguousarray(c.fg_starts, np.int64).tobytes())  # which fg_locations row a forced sample reads
            h.update(np.ascontiguousarray(c.fg_counts, np.int64).tobytes())
        return h.hexdigest()[:16]


# The slots of the uniform draws, fixed so that switching one transform off does not change the
# parameters of any other (nor the case, position or class, which live in other streams).
_SLOTS_SAMPLE = 20
_SLOTS_CHANNEL = 16


# --------------------------------------------------------------------------------------------
# Augmentation parameters: the plan owns them (drawn from its counter-based generator)
# --------------------------------------------------------------------------------------------


def _bg_contrast(u_half: float, u_val: float, lo: float, hi: float) -> float:
    # batchgeneratorsv2's BGContrast: 50/50 below or above 1 (when the range straddles 1).
    if u_half < 0.5 and lo < 1:
        return lo + (1 - lo) * u_val
    low = max(lo, 1.0)
    return low + (hi - low) * u_val


def identity_params(channels: int) -> dict[str, np.ndarray]:
    """Parameters that leave a sample as a centre crop (augmentation off, validation patches)."""
    return {
        "spatial": np.array(False),
        "rotation": np.zeros(3, np.float64),
        "scale": np.array(1.0),
        "mirror": np.zeros(3, bool),
        "noise_std": np.array(0.0, np.float32),
        "blur_sigma": np.zeros((channels, 3), np.float32),
        "brightness": np.zeros(channels, np.float32),
        "contrast": np.zeros(channels, np.float32),
        "lowres": np.zeros(channels, np.float32),
        "gamma_inverted": np.zeros(channels, np.float32),
        "gamma": np.zeros(channels, np.float32),
    }


def draw_params(rng: np.random.Generator, cfg, channels: int) -> dict[str, np.ndarray]:
    """Every augmentation parameter of one sample from its own generator (``cfg``: AugmentationConfig).

    Factors use 0 for "off" (no valid factor is 0). All slots are drawn whether or not a transform
    fires, so the layout never shifts.
    """
    u = rng.random(_SLOTS_SAMPLE + channels * _SLOTS_CHANNEL)
    p = identity_params(channels)
    if not cfg.enabled:
        return p
    rotate = u[0] < cfg.rotation_p
    scale = u[4] < cfg.scaling_p
    if rotate:
        r = math.radians(cfg.rotation_max_deg)
        p["rotation"] = (-r + 2 * r * u[1:4]).astype(np.float64)
    if scale:
        lo, hi = cfg.scaling_range
        p["scale"] = np.array(lo + (hi - lo) * u[5])
    p["spatial"] = np.array(bool(rotate or scale))
    if cfg.mirror:
        allowed = np.zeros(3, bool)
        allowed[list(cfg.mirror_axes)] = True
        p["mirror"] = (u[15:18] < 0.5) & allowed
    if u[6] < cfg.noise_p:
        lo, hi = cfg.noise_variance
        p["noise_std"] = np.array(lo + (hi - lo) * u[7], np.float32)
    blur, bright, contrast = u[9] < cfg.blur_p, u[10] < cfg.brightness_p, u[11] < cfg.contrast_p
    lowres, gamma_inv, gamma = u[12] < cfg.lowres_p, u[13] < cfg.gamma_inverted_p, u[14] < cfg.gamma_p
    for c in range(channels):
        w = u[_SLOTS_SAMPLE + c * _SLOTS_CHANNEL: _SLOTS_SAMPLE + (c + 1) * _SLOTS_CHANNEL]
        if blur and w[0] < cfg.blur_per_channel_p:
            lo, hi = cfg.blur_sigma
            p["blur_sigma"][c] = lo + (hi - lo) * w[1:4]
        if bright:
            p["brightness"][c] = _bg_contrast(w[4], w[5], *cfg.brightness_range)
        if contrast:
            p["contrast"][c] = _bg_contrast(w[6], w[7], *cfg.contrast_range)
        if lowres and w[8] < cfg.lowres_per_channel_p:
            lo, hi = cfg.lowres_zoom
            p["lowres"][c] = lo + (hi - lo) * w[9]
        if gamma_inv:
            p["gamma_inverted"][c] = _bg_contrast(w[10], w[11], *cfg.gamma_range)
        if gamma:
            p["gamma"][c] = _bg_contrast(w[12], w[13], *cfg.gamma_range)
    return p
