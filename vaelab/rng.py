"""Random numbers keyed by what they are for.

Every draw is a pure function of a key and a counter: a 64-bit key names the
purpose (say, the binarization of epoch 3 of seed 0, or the importance-sampling
noise of test image 417), and the counter numbers the values drawn for it. The
hash is SplitMix64's finalizer, written in int64 tensor operations, so it

- runs on any device and gives the same bits on each (integer arithmetic wraps);
- can be sliced: row i's numbers do not depend on which other rows are drawn;
- runs inside a captured CUDA graph (the key can live in a tensor).

A run's results then depend on (seed, purpose, index) only, never on chunk
sizes, batch sizes, the number of processes or where a resume happened.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15           # 2^64 / golden ratio, SplitMix64's increment
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(u: int) -> int:
    """An unsigned 64-bit integer as the int64 with the same bits."""
    u &= _MASK
    return u - (1 << 64) if u >> 63 else u


GAMMA, M1, M2 = _signed(_GAMMA), _signed(_M1), _signed(_M2)


def key(seed: int, purpose: str, *index: int) -> int:
    """The int64 key of a purpose: e.g. key(0, "observe", 3) for epoch 3's pixels.

    A hash of the seed, the purpose's name and the indices, so that every
    purpose has its own stream and a new purpose never shifts another's.
    """
    text = ":".join(map(str, (seed, purpose, *index))).encode()
    return _signed(int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little"))


def _shift_xor_(x: torch.Tensor, s: int) -> torch.Tensor:
    """x ^= x >>> s (a logical shift: int64's >> copies the sign bit, so mask it off)."""
    return x.bitwise_xor_(torch.bitwise_right_shift(x, s).bitwise_and_((1 << (64 - s)) - 1))


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer, elementwise on int64 (a new tensor; x is kept)."""
    x = x.clone()
    _shift_xor_(x, 30).mul_(M1)
    _shift_xor_(x, 27).mul_(M2)
    return _shift_xor_(x, 31)


def row_keys(base: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One key per row: base's purpose, row `index` (e.g. an image's number). (B,) -> (B,) int64."""
    return mix(index.to(torch.int64).mul(GAMMA).add_(base))


def image_keys(seed: int, purpose: str, index: torch.Tensor) -> torch.Tensor:
    """Keys of images `index` (their positions in a test set or a listing) for a purpose
    ("observe" or "noise"): (N,) int64. What image i draws depends on (seed, i) alone."""
    return row_keys(key(seed, purpose), index)


def bits(keys: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """64 random bits for counters start .. start+n-1 of each key: (...,) int64 -> (..., n) int64."""
    counters = torch.arange(start + 1, start + n + 1, dtype=torch.int64, device=keys.device).mul_(GAMMA)
    return mix(keys.unsqueeze(-1) + counters)


def uniform16(keys: torch.Tensor, n: int) -> torch.Tensor:
    """n integers uniform in [0, 65536) per key, four from each 64-bit hash: (...,) -> (..., n) int32."""
    words = bits(keys, (n + 3) // 4)
    halves = words.view(torch.int16)[..., :n]           # little-endian: the same on every device
    return halves.to(torch.int32).add_(32768)


def normal(keys: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Standard normal draws for counters start .. start+n-1 of each key: (...,) -> (..., n) float32.

    Box-Muller on two 24-bit uniforms from each hash: u1 in (0, 1] keeps the log finite.
    """
    h = bits(keys, n, start)
    scale = 2.0 ** -24
    u1 = torch.bitwise_right_shift(h, 40).bitwise_and_(0xFFFFFF).to(torch.float32).add_(1).mul_(scale)
    u2 = torch.bitwise_right_shift(h, 8).bitwise_and_(0xFFFFFF).to(torch.float32).mul_(scale)
    return u1.log_().mul_(-2).sqrt_().mul_(u2.mul_(2 * math.pi).cos_())


def permutation(k: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random permutation of range(n) keyed by k: (n,) int64, the same on every device."""
    h = bits(torch.tensor(k, dtype=torch.int64, device=device), n)
    return torch.sort(h, stable=True).indices
