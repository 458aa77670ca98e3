"""Counter-based randomness: every random number of a run is a documented function of its seed.

A sweep trains K copies at once and a plain PyTorch loop trains one; both must draw the *same*
minibatches and the *same* noise for a given ``seed`` whatever the chunk, device or K. So nothing here
keeps a generator state: a value is a hash of ``(seed, purpose, step, stream, j)``.

The hash is the 32-bit integer mixer ``mix(x) = xorshift-multiply`` (two rounds of ``x ^= x >> s;
x *= c mod 2³²``, a bijection of [0, 2³²)), evaluated in int64 tensors on the data's device so that
K copies are one vectorised call and no product overflows (x < 2³², c < 2³¹). Chaining

    key = mix(mix(mix(mix(seed) ^ purpose) ^ step) ^ stream),   h_j = mix(key ^ mix(j))

gives 32-bit words h_j, distinct over j for a fixed key. Then

* **minibatch indices** (:func:`batch_indices`): sample j < B is ``h_j mod n`` (uniform with
  replacement; modulo bias ≤ n/2³²). ``batch_size == n`` means full-batch gradient descent: the indices
  are ``0..n-1`` in order, no randomness.
* **standard normals** (:func:`gaussian`): Box–Muller on pairs of uniforms ``(h + 0.5)/2³²`` computed in
  float64, then cast to the requested dtype.

Seeds are integers in [0, 2³²).
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x1B873593  # odd multipliers < 2**31: x * c < 2**63 for x < 2**32

INDICES, NOISE, OFFSET = 1, 2, 3  # purposes: minibatches, gradient noise, decay offset θ₀


def mix(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit mixer on int64 tensors holding values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _C2) & MASK32
    return x ^ (x >> 16)


def mix_int(x: int) -> int:
    """:func:`mix` on a Python int (the scalar path: no tiny tensor ops in a single-model loop)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _C1) & MASK32
    x ^= x >> 15
    x = (x * _C2) & MASK32
    return x ^ (x >> 16)


def seed_key(seed, purpose: int, device=None):
    """mix(mix(seed) ^ purpose): the step-independent half of :func:`key` (cache it across steps)."""
    if isinstance(seed, int):
        return mix_int(mix_int(seed) ^ purpose)
    return mix(mix(torch.as_tensor(seed, dtype=torch.long, device=device) & MASK32) ^ purpose)


def step_key(h, step: int, stream: int = 0):
    """mix(mix(h ^ step) ^ stream) for ``h`` from :func:`seed_key` (an int or a tensor)."""
    if isinstance(h, int):
        return mix_int(mix_int(h ^ (step & MASK32)) ^ stream)
    return mix(mix(h ^ (step & MASK32)) ^ stream)


def key(seed, purpose: int, step: int, stream: int = 0, device=None):
    """The 32-bit key of (seed, purpose, step, stream): an int for an int seed, else a tensor like
    ``seed`` (e.g. (K,))."""
    return step_key(seed_key(seed, purpose, device), step, stream)


_COUNTERS: dict[tuple[int, str], torch.Tensor] = {}


def _mixed_counter(count: int, device) -> torch.Tensor:
    """mix(0..count-1), cached per (count, device)."""
    device = torch.device(device if device is not None else "cpu")
    cache_key = (count, str(device))
    if cache_key not in _COUNTERS:
        if len(_COUNTERS) > 64:
            _COUNTERS.clear()
        _COUNTERS[cache_key] = mix(torch.arange(count, dtype=torch.long, device=device))
    return _COUNTERS[cache_key]


def words(k, count: int, device=None) -> torch.Tensor:
    """``count`` 32-bit words per key ``k`` (an int, or a tensor): shape ``(*k.shape, count)``."""
    if isinstance(k, int):
        return mix(_mixed_counter(count, device) ^ k)
    return mix(k.unsqueeze(-1) ^ _mixed_counter(count, k.device))


def _indices(h, step: int, n: int, batch_size: int, batch: tuple, device) -> torch.Tensor:
    if batch_size == n:
        return torch.arange(n, device=device).expand(*batch, n)
    return words(step_key(h, step), batch_size, device) % n


def _normals(h, step: int, stream: int, shape, dtype, batch: tuple, device) -> torch.Tensor:
    numel = math.prod(shape)
    w = words(step_key(h, step, stream), 2 * numel, device).double()
    u = (w + 0.5) / 2.0**32
    u1, u2 = u[..., :numel], u[..., numel:]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.reshape(*batch, *shape).to(dtype)


def batch_indices(seed, step: int, n: int, batch_size: int, device=None) -> torch.Tensor:
    """The minibatch of ``seed`` at optimisation step ``step`` (0-based): indices into dim 0 of the data.

    ``seed`` an int gives shape (batch_size,); a (K,) tensor gives (K, batch_size). Sampling is uniform
    with replacement, ``h_j mod n`` (module docstring); ``batch_size == n`` is full-batch GD (0..n-1).
    """
    return Streams(seed, device).batch_indices(step, n, batch_size)


def gaussian(seed, purpose: int, step: int, stream: int, shape, dtype=torch.float32,
             device=None) -> torch.Tensor:
    """Standard normals of shape ``(*seed.shape, *shape)`` from (seed, purpose, step, stream).

    ``stream`` separates tensors drawn at the same step (the parameter's position in
    ``named_parameters()`` order). Box–Muller in float64, then cast to ``dtype``.
    """
    return Streams(seed, device).gaussian(purpose, step, stream, shape, dtype)


class Streams:
    """The random streams of one seed or of a (K,) tensor of seeds, with the step-independent half of
    every key computed once (what the vmapped trainer calls at each step). Same values as
    :func:`batch_indices` and :func:`gaussian`."""

    def __init__(self, seed, device=None):
        if isinstance(seed, torch.Tensor) and seed.dim() == 0 and device is None:
            seed = int(seed)
        if isinstance(seed, int):
            self.seed, self.batch, self.device = seed, (), device
        else:
            self.seed = torch.as_tensor(seed, dtype=torch.long, device=device)
            self.batch, self.device = tuple(self.seed.shape), self.seed.device
        self._keys: dict[int, object] = {}

    def _key(self, purpose: int):
        if purpose not in self._keys:
            self._keys[purpose] = seed_key(self.seed, purpose, self.device)
        return self._keys[purpose]

    def batch_indices(self, step: int, n: int, batch_size: int) -> torch.Tensor:
        return _indices(self._key(INDICES), step, n, batch_size, self.batch, self.device)

    def gaussian(self, purpose: int, step: int, stream: int, shape, dtype=torch.float32) -> torch.Tensor:
        return _normals(self._key(purpose), step, stream, tuple(shape), dtype, self.batch, self.device)
