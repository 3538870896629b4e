"""Checkpoints that survive kills, corruption and a change of world size.

- ``commit``: the commit protocol (tmp dir, manifest with crc32c, marker, atomic rename, ``latest``).
- ``portable``: world-size-independent fp32 params + SGD momentum (safetensors), and a DCP reader.
- ``state``: our counters and per-rank RNG.
- ``manager``: what the trainer saves and how a resume is planned (native vs portable).
- ``consolidated``: ``load_consolidated(path)``, full fp32 weights for export, any backend/world size,
  from ``portable/`` only (nothing unpickled).
- ``trust_native``: ``--trust-native`` conversion of an old checkpoint of one's own run (reads pickles).
"""

from .commit import CheckpointError, NoValidCheckpoint
from .consolidated import ConsolidatedCheckpoint, NoPortableCopy, load_consolidated

__all__ = ["CheckpointError", "NoValidCheckpoint", "NoPortableCopy", "ConsolidatedCheckpoint", "load_consolidated"]
