"""WebDataset reader: tar shards streamed per consumer, a buffer of decoded volumes, several patches each.

For nodes that must stream from object storage instead of random-accessing a local Zarr copy.
Every (rank, DataLoader worker) pair is one *consumer*; the stream of a consumer is a pure function
of ``(seed, epoch, consumer, world size, num_workers)`` and of the manifest, never of timing:

- **Splitting (explicit node and worker splitting).** Per epoch the training shards are permuted by
  ``(seed, epoch)``; consumer ``c`` of ``C = world_size * num_workers`` takes positions
  ``c, c + C, ...`` of the permutation *modulo the shard count*, so every consumer gets at least one
  shard even with fewer shards than consumers (then consumers share shards), and its shard list
  repeats if it runs dry before its quota.
- **Equal batches.** What a consumer yields is a count, not "until the shards end": every rank
  yields exactly ``steps_per_epoch * grad_accumulation`` micro-batches per epoch (``schedule.
  samples_per_epoch / global_batch`` steps), whatever the shard sizes, so collectives never wait on
  a rank that ran out of data.
- **Buffer.** A consumer keeps ``data.wds_buffer_cases`` decoded volumes; each patch comes from a
  buffer slot drawn by the consumer's seeded generator, and a volume leaves after
  ``data.wds_patches_per_case`` patches, replaced by the next case of the stream.
- **Samples.** The case comes from the stream; foreground forcing, class, voxel, position and every
  augmentation parameter come from the sample plan at the sample's global index, as with Zarr.

Resume semantics: the case sequence and the buffer bookkeeping need only the manifest's per-shard
case lists, not the data. A stream that resumes at step ``s`` replays the bookkeeping of the
patches already consumed in that epoch without decoding anything, then decodes the volumes that
are in the buffer at that point (reading forward through their shards) and continues, so with the
same world size and ``num_workers`` it yields exactly the batches an uninterrupted run would. What
is NOT restored: with a different world size or ``num_workers`` the consumer layout changes, so
the case sequence changes from the resumed epoch on (sample indices, augmentation parameters and
foreground decisions stay those of the plan); skipping costs reading (not decoding) up to one
shard per buffered volume.

The shards are plain WebDataset tars (members grouped by key; ``webdataset.WebDataset`` reads
them). This reader streams them with ``tarfile`` itself because exact resume needs per-consumer
shard lists and skipping members without decoding them, which webdataset's pipeline does not
offer (and its default node splitter raises at world size > 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ...config import ConfigError, micro_batches_per_rank
from ..store import REBUILD_HINT, PreparedStore, StoreIntegrityError, decode_wds_sample, iter_wds_groups, wds_key
from .plan import STREAM_WDS, SamplePlan
from .readers import ArrayReader, assemble_micro_batch, image_format, normalization
from .transforms import finish

_MASK64 = (1 << 64) - 1


def _epoch_rng(seed: int, epoch: int, consumer: int) -> np.random.Generator:
    key = np.array([int(seed) & _MASK64, int(epoch) & _MASK64], dtype=np.uint64)
    counter = np.array([0, 0, int(consumer) & _MASK64, STREAM_WDS], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


def train_shards(store: PreparedStore, splits) -> list[dict]:
    """Manifest entries of the WebDataset shards holding training cases, in manifest order."""
    return [s for s in store.manifest.get("wds_shards") or [] if s["split"] in splits and s["cases"]]


def consumer_shards(n_shards: int, seed: int, epoch: int, consumer: int, consumers: int) -> list[int]:
    """Shard indices consumer ``consumer`` streams in ``epoch`` (at least one, even if n_shards < consumers)."""
    perm = _epoch_rng(seed, epoch, 2**32).permutation(n_shards)
    k = max(1, math.ceil(n_shards / consumers))
    return [int(perm[(consumer + i * consumers) % n_shards]) for i in range(k)]


class CaseSequence:
    """The consumer's endless sequence of (shard, case id): its shards in order, repeated."""

    def __init__(self, shards: list[dict], order: list[int]):
        self.items = [(i, cid) for i in order for cid in shards[i]["cases"]]

    def __getitem__(self, q: int) -> tuple[int, str]:
        return self.items[q % len(self.items)]


class BufferPlan:
    """Which case each patch of a consumer's epoch comes from: a pure function of the case sequence.

    ``advance()`` returns (sequence position of the case, patch number) and tracks which sequence
    positions are in the buffer; nothing here reads data, so a resume can replay it for free.
    """

    def __init__(self, rng: np.random.Generator, buffer_cases: int, patches_per_case: int):
        self.rng = rng
        self.size = buffer_cases
        self.per_case = patches_per_case
        self.slots: list[list[int]] = []  # [sequence position, patches left]
        self.next_q = 0

    def advance(self) -> int:
        while len(self.slots) < self.size:
            self.slots.append([self.next_q, self.per_case])
            self.next_q += 1
        i = int(self.rng.integers(len(self.slots)))
        q = self.slots[i][0]
        self.slots[i][1] -= 1
        if self.slots[i][1] == 0:
            self.slots[i] = [self.next_q, self.per_case]
            self.next_q += 1
        return q

    def live(self) -> list[int]:
        return sorted(s[0] for s in self.slots)


class ShardCursor:
    """Forward-only reader of sequence positions: decodes the requested cases, skips the rest.

    A *run* is a stretch of positions in one shard in one pass over the sequence; a run before the
    requested position is never opened, and inside a run the members of unneeded cases are read
    past without decoding. Members are streamed (``tarfile`` "r|"), one case at a time; a shard
    whose keys differ from the manifest's list (truncated, replaced) raises ``StoreIntegrityError``.
    """

    def __init__(self, store: PreparedStore, shards: list[dict], seq: CaseSequence):
        self.store, self.shards, self.seq = store, shards, seq
        self.q = -1  # sequence position of the last group read
        self._groups: Iterator | None = None
        self._run = -1  # start position of the open run

    def _run_start(self, q: int) -> int:
        n = len(self.seq.items)
        r = q
        while r % n != 0 and self.seq[r - 1][0] == self.seq[r][0]:
            r -= 1
        return r

    def get(self, q: int):
        """Decode the case at sequence position ``q`` (q increasing between calls)."""
        if q <= self.q:
            raise ValueError("ShardCursor reads forward only")
        run = self._run_start(q)
        if self._groups is None or run != self._run:
            if self._groups is not None:
                self._groups.close()
            shard_idx, _ = self.seq[run]
            shard = self.shards[shard_idx]
            self._groups = iter_wds_groups(Path(self.store.root) / shard["path"], [wds_key(c) for c in shard["cases"]])
            self._run, self.q = run, run - 1
        group = None
        while self.q < q:
            try:
                group = next(self._groups)
            except StopIteration:
                raise StoreIntegrityError(f"shard {self.shards[self.seq[q][0]]['path']} ended before case "
                                          f"{self.seq[q][1]!r} (truncated). {REBUILD_HINT}") from None
            self.q += 1
        return decode_wds_sample(group, self.store.manifest)


class WdsCaseHandle:
    """The reader-facing view of a decoded WebDataset case (same interface as readers.CaseHandle)."""

    def __init__(self, case, norm: np.ndarray, num_classes: int | None = None):
        self.case_id = case.case_id
        self.meta = case.meta
        self.num_classes = num_classes  # with meta's missing_classes: the batch's "annotated" mask
        self.image = ArrayReader(np.asarray(case.image))
        self.label = ArrayReader(np.asarray(case.label))
        self.shape = tuple(self.label.shape[-3:])
        self.image_has_channels = self.image.array.ndim == 4
        self.norm = norm
        self._fg = np.asarray(case.fg_locations).reshape(-1, 4)

    def fg_voxel(self, row: int) -> np.ndarray:
        if not 0 <= row < len(self._fg):
            raise StoreIntegrityError(f"case {self.case_id!r}: fg_locations has {len(self._fg)} rows, the manifest "
                                      f"ranges point at row {row}. {REBUILD_HINT}")
        return self._fg[row, 1:4]


class ConsumerStream:
    """One consumer's patches for one epoch: ``next_case()`` gives the handle of each patch in order."""

    def __init__(self, store: PreparedStore, shards: list[dict], plan: SamplePlan, cfg, *, epoch: int, consumer: int,
                 consumers: int, skip_patches: int = 0):
        order = consumer_shards(len(shards), cfg.seed, epoch, consumer, consumers)
        self.seq = CaseSequence(shards, order)
        self.buffer = BufferPlan(_epoch_rng(cfg.seed, epoch, consumer), cfg.data.wds_buffer_cases,
                                 cfg.data.wds_patches_per_case)
        for _ in range(skip_patches):  # replay the bookkeeping of consumed patches: no I/O
            self.buffer.advance()
        self.cursor = ShardCursor(store, shards, self.seq)
        self.store, self.cfg = store, cfg
        self.decoded: dict[int, WdsCaseHandle] = {}

    def next_case(self) -> WdsCaseHandle:
        q = self.buffer.advance()
        # decode every live sequence position not decoded yet, in sequence order (forward reads);
        # positions enter the buffer in increasing order, so none is ever behind the cursor
        for p in sorted(set(self.buffer.live()) | {q}):
            if p not in self.decoded:
                case = self.cursor.get(p)
                norm = normalization(self.store, case.meta, self.cfg.data.normalization, 1)
                self.decoded[p] = WdsCaseHandle(case, norm, self.store.num_classes)
        handle = self.decoded[q]
        live = set(self.buffer.live())
        for p in [p for p in self.decoded if p not in live]:
            del self.decoded[p]
        return handle


class WdsMicroBatches(torch.utils.data.IterableDataset):
    """The rank's micro-batches from WebDataset shards (see the module docstring).

    DataLoader output ``k`` is micro-batch ``start_step * accumulation + k`` and comes from worker
    ``k % num_workers`` (the DataLoader's in-order round robin over endless workers). Consumer ids
    are keyed by ``micro-batch % num_workers`` so a resume at any step keeps every micro-batch on
    the same consumer stream. ``epochs`` (tests, benchmarks) stops after that many epochs.
    """

    def __init__(self, store: PreparedStore, plan: SamplePlan, geometry, cfg, *, rank: int, world_size: int,
                 micro_batch: int, accumulation: int, start_step: int, augment_in_worker: bool,
                 epochs: int | None = None):
        if cfg.data.case_weighting != "uniform":
            raise ConfigError("data.case_weighting must be uniform with data.format=wds (cases come in shard order); "
                              "use data.format=zarr for split or class_rarity weighting")
        self.shards = train_shards(store, cfg.data.train_splits)
        if not self.shards:
            raise ConfigError(f"data.train_splits={cfg.data.train_splits}: {store.root} has no WebDataset shard of these splits")
        self.store, self.plan, self.geometry, self.cfg = store, plan, geometry, cfg
        self.rank, self.world_size = rank, world_size
        self.micro_batch, self.accumulation = micro_batch, accumulation
        self.start_micro = int(start_step) * accumulation
        self.augment_in_worker = augment_in_worker
        self.epochs = epochs
        micro_batches_per_rank(cfg.global_batch, cfg.micro_batch, world_size)  # ConfigError naming the key
        self.micro_per_epoch = -(-cfg.samples_per_epoch // cfg.global_batch) * accumulation
        self.num_workers = max(1, cfg.data.num_workers)
        self.image_format = image_format(store)

    def micro_batches_per_epoch(self) -> int:
        return self.micro_per_epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        nw = info.num_workers if info is not None else 1
        if nw != self.num_workers and info is not None:
            raise RuntimeError(f"expected {self.num_workers} workers, got {nw}")
        M = self.micro_per_epoch
        v = (self.start_micro + worker) % nw  # virtual consumer: the residue class of the micro-batches it serves
        consumer, consumers = self.rank * nw + v, self.world_size * nw
        j = self.start_micro + worker
        stop = None if self.epochs is None else (self.start_micro // M + self.epochs) * M
        stream, stream_epoch = None, None

        while stop is None or j < stop:
            epoch = j // M
            if stream_epoch != epoch:
                # patches this consumer already served in this epoch (micro-batches j' < j with j' = v mod nw)
                first = epoch * M
                done = _count_residue(first, j, v, nw) * self.micro_batch
                stream = ConsumerStream(self.store, self.shards, self.plan, self.cfg, epoch=epoch, consumer=consumer,
                                        consumers=consumers, skip_patches=done)
                stream_epoch = epoch
            step, micro = divmod(j, self.accumulation)
            indices = self.plan.micro_batch_indices(step, self.rank, self.world_size, micro, self.micro_batch)
            handles = [stream.next_case() for _ in indices]
            specs = [self.plan.sample(i, case=self.plan.case_index[h.case_id]) for i, h in zip(indices, handles)]
            # voxels go to shared memory only when the raw batch itself is handed to the main process
            raw = assemble_micro_batch(specs, handles, self.plan, 1, *self.image_format,
                                       shared=False if self.augment_in_worker else getattr(self, "pool", None))
            yield finish(raw, self.geometry, torch.device("cpu"), in_worker=True) if self.augment_in_worker else raw
            j += nw


def _count_residue(a: int, b: int, r: int, n: int) -> int:
    """How many integers x in [a, b) have x % n == r."""
    def upto(x):  # count in [0, x)
        return (x - r + n - 1) // n if x > r else 0
    return upto(b) - upto(a)


def load_wds_case(store: PreparedStore, case_id: str):
    """Decode one case from its shard (validation on a wds-only store)."""
    entry = store.meta(case_id).get("wds") or {}
    shard = next((s for s in store.manifest.get("wds_shards") or [] if s["path"] == entry.get("shard")), None)
    if shard is None:
        raise StoreIntegrityError(f"case {case_id!r} is not in any WebDataset shard of {store.root}")
    key = wds_key(case_id)
    for group in iter_wds_groups(Path(store.root) / shard["path"], [wds_key(c) for c in shard["cases"]]):
        if group["__key__"] == key:
            return decode_wds_sample(group, store.manifest)
    raise StoreIntegrityError(f"case {case_id!r} not found in {shard['path']}")
