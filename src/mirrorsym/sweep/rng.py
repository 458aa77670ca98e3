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

Purposes (the second key part): ``INDICES`` (minibatches), ``NOISE`` (gradient noise, stream = the
parameter's position), ``OFFSET`` (the decay offset θ₀, step 0) and ``RANDOM_INPUTS`` (the model's random
inputs ε_j ~ N(0, 1) of ``Sweep(random_inputs=k)``, stream = j, shaped like the step's minibatch input).

Seeds are integers in [0, 2³²).

**Blocks.** The trainer draws many steps at once (:meth:`Streams.batch_indices_block`,
:meth:`Streams.gaussian_block`): the same words, computed on the host in ``uint32`` NumPy arithmetic
(wrapping multiplication mod 2³² is exactly the masked int64 product above) and moved to the device in
one copy. A block's values equal the per-step functions' bit for bit, so a run's randomness depends on
its seed and step only, never on how steps are grouped into blocks or runs into chunks.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x1B873593  # odd multipliers < 2**31: x * c < 2**63 for x < 2**32

INDICES, NOISE, OFFSET, RANDOM_INPUTS = 1, 2, 3, 4  # purposes: minibatches, gradient noise, decay offset θ₀,
# the model's random inputs (``Sweep(random_inputs=k)``: stream j < k is the j-th extra forward argument)


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


def mix_np(x: np.ndarray) -> np.ndarray:
    """:func:`mix` on a ``uint32`` NumPy array (a new array; the same values as the int64 version)."""
    x = x ^ (x >> np.uint32(16))
    x *= _C1_U32
    x ^= x >> np.uint32(15)
    x *= _C2_U32
    x ^= x >> np.uint32(16)
    return x


_C1_U32, _C2_U32 = np.uint32(_C1), np.uint32(_C2)

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


def _indices(h, step: int, n: int, batch_size: int, batch: tuple, device, replace: bool = True) -> torch.Tensor:
    if batch_size == n:
        return torch.arange(n, device=device).expand(*batch, n)
    if not replace:  # the B samples with the smallest of n distinct words: a uniform random B-subset
        return words(step_key(h, step), n, device).argsort(dim=-1)[..., :batch_size]
    return words(step_key(h, step), batch_size, device) % n


def _normals(h, step: int, stream: int, shape, dtype, batch: tuple, device) -> torch.Tensor:
    numel = math.prod(shape)
    z = _box_muller(words(step_key(h, step, stream), 2 * numel, device).double(), numel)
    return z.reshape(*batch, *shape).to(dtype)


def _box_muller(w: torch.Tensor, numel: int) -> torch.Tensor:
    """Standard normals from float64 32-bit words ``w`` (..., 2·numel), overwritten: u = (w + ½)/2³²,
    z = √(−2 log u₁) cos(2π u₂). In place (the block draw is memory-bound); ×2⁻³² is exactly /2³²."""
    u = w.add_(0.5).mul_(2.0**-32)
    u1, u2 = u[..., :numel], u[..., numel:]
    return u1.log_().mul_(-2.0).sqrt_().mul_(u2.mul_(2.0 * math.pi).cos_())


def batch_indices(seed, step: int, n: int, batch_size: int, device=None, replace: bool = True) -> torch.Tensor:
    """The minibatch of ``seed`` at optimisation step ``step`` (0-based): indices into dim 0 of the data.

    ``seed`` an int gives shape (batch_size,); a (K,) tensor gives (K, batch_size). Sampling is uniform
    with replacement, ``h_j mod n`` (module docstring); ``replace=False``: the indices of the
    ``batch_size`` smallest of the n words h_0..h_{n−1} (distinct, so a uniform random subset, in
    increasing order of their words); ``batch_size == n`` is full-batch GD (0..n-1).
    """
    return Streams(seed, device).batch_indices(step, n, batch_size, replace)


def gaussian(seed, purpose: int, step: int, stream: int, shape, dtype=torch.float32,
             device=None) -> torch.Tensor:
    """Standard normals of shape ``(*seed.shape, *shape)`` from (seed, purpose, step, stream).

    ``stream`` separates tensors drawn at the same step (the parameter's position in
    ``named_parameters()`` order). Box–Muller in float64, then cast to ``dtype``.
    """
    return Streams(seed, device).gaussian(purpose, step, stream, shape, dtype)


@functools.lru_cache(maxsize=64)
def _mixed_counter_np(count: int) -> np.ndarray:
    out = mix_np(np.arange(count, dtype=np.uint32))
    out.flags.writeable = False
    return out


def _step_keys_np(h: np.ndarray, step0: int, count: int, stream: int) -> np.ndarray:
    """mix(mix(h ^ step) ^ stream) for steps step0..step0+count-1: shape (count, *h.shape)."""
    steps = (np.arange(step0, step0 + count, dtype=np.uint64) & MASK32).astype(np.uint32)
    steps = steps.reshape(count, *([1] * h.ndim))
    return mix_np(mix_np(h ^ steps) ^ np.uint32(stream))


def _words_np(keys: np.ndarray, count: int) -> np.ndarray:
    """:func:`words` for a uint32 array of keys: shape ``(*keys.shape, count)``."""
    return mix_np(keys[..., None] ^ _mixed_counter_np(count))


class Streams:
    """The random streams of one seed or of a (K,) tensor of seeds, with the step-independent half of
    every key computed once (what the vmapped trainer calls). Same values as :func:`batch_indices` and
    :func:`gaussian`; the ``*_block`` methods give many consecutive steps at once."""

    def __init__(self, seed, device=None):
        if isinstance(seed, torch.Tensor) and seed.dim() == 0 and device is None:
            seed = int(seed)
        self.seed: int | torch.Tensor
        self.batch: tuple[int, ...]
        if isinstance(seed, int):
            self.seed, self.batch, self.device = seed, (), device
        else:
            seeds = torch.as_tensor(seed, dtype=torch.long, device=device)
            self.seed, self.batch, self.device = seeds, tuple(seeds.shape), seeds.device
        self._keys: dict[int, object] = {}

    def _key(self, purpose: int):
        if purpose not in self._keys:
            self._keys[purpose] = seed_key(self.seed, purpose, self.device)
        return self._keys[purpose]

    def batch_indices(self, step: int, n: int, batch_size: int, replace: bool = True) -> torch.Tensor:
        return _indices(self._key(INDICES), step, n, batch_size, self.batch, self.device, replace)

    def gaussian(self, purpose: int, step: int, stream: int, shape, dtype=torch.float32) -> torch.Tensor:
        return _normals(self._key(purpose), step, stream, tuple(shape), dtype, self.batch, self.device)

    def _key_np(self, purpose: int) -> np.ndarray:
        key = self._key(purpose)
        if isinstance(key, int):
            return np.asarray(key, dtype=np.uint32)
        return key.cpu().numpy().astype(np.uint32)

    def batch_indices_block(self, step0: int, count: int, n: int, batch_size: int,
                            replace: bool = True) -> torch.Tensor:
        """``torch.stack([batch_indices(t, n, B, replace) for t in range(step0, step0 + count)])``: shape
        ``(count, *batch, batch_size)``, int64, on this stream's device; drawn on the host in one go."""
        if batch_size == n:
            return torch.arange(n, device=self.device).expand(count, *self.batch, n)
        keys = _step_keys_np(self._key_np(INDICES), step0, count, 0)
        if not replace:
            order = np.argsort(_words_np(keys, n), axis=-1, kind="stable")[..., :batch_size]
            return torch.from_numpy(order.astype(np.int64)).to(self.device)
        idx = _words_np(keys, batch_size)
        idx %= np.uint32(n)
        return torch.from_numpy(idx.astype(np.int64)).to(self.device)

    def gaussian_block(self, purpose: int, step0: int, count: int, stream: int, shape,
                       dtype=torch.float32) -> torch.Tensor:
        """``torch.stack([gaussian(purpose, t, stream, shape, dtype) for t in range(step0, step0 +
        count)])``: shape ``(count, *batch, *shape)``. The 32-bit words are drawn on the host; Box–Muller
        runs in float64 on the device, as in :func:`gaussian`."""
        shape = tuple(shape)
        numel = math.prod(shape)
        keys = _step_keys_np(self._key_np(purpose), step0, count, stream)
        w = torch.from_numpy(_words_np(keys, 2 * numel).astype(np.float64)).to(self.device)
        return _box_muller(w, numel).reshape(count, *self.batch, *shape).to(dtype)
