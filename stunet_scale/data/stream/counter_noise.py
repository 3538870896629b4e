"""Counter-based Gaussian noise: the field is a pure function of (key, voxel index), on any device."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Gaussian noise is generated where the batch is augmented, from a 32-bit key the sample plan
# draws per sample (``SamplePlan.noise_key``) and the voxel index: no 8 MB float field per noisy
# sample crosses the worker boundary or the PCIe bus. Integer hashing in int64 is exact on every
# device, so CPU and GPU draw the same uniforms; Box-Muller then agrees to float rounding.
_HASH_MUL = 0x45D9F3B  # Thomas Mueller's xorshift-multiply hash; < 2^27, so x * it < 2^59 is exact
_M32 = 0xFFFFFFFF
_NOISE_CHUNK = 1 << 19  # voxel pairs per step: ~4 MB int64 scratch, reused (fresh pages cost more than the math)
_ANGLE_COUNTERS = 1 << 31  # the angle uniforms' counters start here (a field has < 2^31 voxels)
_noise_cache: dict = {}


def _hash32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """In place: x <- hash(x) for int64 x in [0, 2^32) (two xorshift-multiply rounds, final xorshift)."""
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=tmp)
        x.bitwise_xor_(tmp).mul_(_HASH_MUL).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp)


def _noise_scratch(dev: torch.device, pairs: int) -> dict:
    """Per-device work buffers, and hash(counter) for the radius and angle counters of ``pairs``
    voxel pairs (the key-independent half of every uniform, computed once per device)."""
    key = (dev.type, dev.index)
    s = _noise_cache.get(key)
    if s is None:
        n = _NOISE_CHUNK
        s = {name: torch.empty(n, dtype=dtype, device=dev) for name, dtype in
             (("tmp", torch.int64), ("x", torch.int64), ("u1", torch.float32), ("u2", torch.float32), ("t", torch.float32))}
        s["pairs"] = 0
        _noise_cache[key] = s
    if s["pairs"] < pairs:
        tables = []
        for start in (0, _ANGLE_COUNTERS):
            c = torch.arange(start, start + pairs, dtype=torch.int64, device=dev)
            tables.append(_hash32_(c, torch.empty_like(c)))
        s["radius"], s["angle"], s["pairs"] = tables[0], tables[1], pairs
    return s


def _uniform_(out: torch.Tensor, hashed_counters: torch.Tensor, key: int, s: dict) -> torch.Tensor:
    """out[i] = U(key, counter i) in (0, 1), float32 with 24 random bits, from hash(counter).

    U = hash(hash(counter) ^ key): the inner hash spreads consecutive counters over 32 bits, so
    the key does not merely permute one shared sequence; the outer one mixes the key in.
    """
    n = out.numel()
    x, tmp = s["x"][:n], s["tmp"][:n]
    torch.bitwise_xor(hashed_counters, key, out=x)
    _hash32_(x, tmp)
    torch.bitwise_right_shift(x, 8, out=tmp)
    return out.copy_(tmp).add_(0.5).mul_(2.0 ** -24)


def add_gaussian_noise_(x: torch.Tensor, key: int, std: float) -> torch.Tensor:
    """x += std * N(0, 1) iid per voxel, the field a pure function of (key, voxel index).

    Box-Muller on counter-based uniforms: voxel pair (i, i + h) of the flattened tensor (h = half
    its size, rounded up) takes r cos(t) and r sin(t), with r from the uniform of counter i and t
    from that of counter 2^31 + i. Works on any device; CPU and CUDA agree to float rounding (the
    integers are exact). Two noisy samples share a field only if their 32-bit keys collide.
    """
    flat = x.view(-1)
    n = flat.numel()
    h = (n + 1) // 2
    key = int(key) & _M32
    s = _noise_scratch(flat.device, h)
    for a in range(0, h, _NOISE_CHUNK):
        k = min(_NOISE_CHUNK, h - a)
        u1, u2, t = s["u1"][:k], s["u2"][:k], s["t"][:k]
        _uniform_(u1, s["radius"][a:a + k], key, s)  # radius: counters [0, h)
        _uniform_(u2, s["angle"][a:a + k], key, s)  # angle: counters [2^31, 2^31 + h)
        r = u1.log_().mul_(-2.0).sqrt_().mul_(std)
        u2.mul_(2 * math.pi)
        torch.cos(u2, out=t)
        flat[a:a + k].addcmul_(r, t)
        m = min(k, n - h - a)  # the second half is one shorter when n is odd
        if m > 0:
            torch.sin(u2[:m], out=t[:m])
            flat[h + a:h + a + m].addcmul_(r[:m], t[:m])
    return x


def gaussian_noise(key: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The unit noise field ``add_gaussian_noise_`` adds for ``key`` (tests, inspection)."""
    return add_gaussian_noise_(torch.zeros(tuple(shape), dtype=torch.float32, device=device), key, 1.0)

