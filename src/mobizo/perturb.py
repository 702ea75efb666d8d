"""Seeded, counter-based Gaussian noise made of ordinary tensor ops.

The perturbation direction z of a ZO step must be a pure function of
(run seed, step, tensor id, direction, element index) so that

* a run is reproducible bit for bit in eager mode (resume, replay),
* all estimators (``prge``, ``prge-outer``, ``mezo``) see the same directions,
* the exported ExecuTorch program can make z *inside* the graph from the step
  number alone: no random input from the host and no RNG state.

We hash a 32-bit counter with a multiply/xor-shift mixer and turn pairs of
hashes into normals with Box-Muller. Everything is int64 arithmetic whose
products stay below 2**63 (no overflow, so C++ kernels and PyTorch agree) and
uses only ops the ExecuTorch portable library has: mul, add, bitwise_xor,
bitwise_and and floor division (there is no right-shift kernel there).
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 so that (x < 2**32) * c < 2**63 never overflows int64.
_M1 = 0x7FEB352D
_M2 = 0x446CA68B
_GOLDEN = 0x1E3779B9


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    # Logical right shift of non-negative int64 values (floor division by 2**k).
    return torch.div(x, 1 << k, rounding_mode="floor")


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit integer mixer (lowbias32 shape) on int64 tensors in [0, 2**32)."""
    x = torch.bitwise_xor(x, _shr(x, 16))
    x = torch.bitwise_and(x * _M1, MASK32)
    x = torch.bitwise_xor(x, _shr(x, 15))
    x = torch.bitwise_and(x * _M2, MASK32)
    x = torch.bitwise_xor(x, _shr(x, 16))
    return x


def _mix_in(key: torch.Tensor, value) -> torch.Tensor:
    value = torch.bitwise_and(torch.as_tensor(value, dtype=torch.int64), MASK32)
    return mix32(torch.bitwise_and(torch.bitwise_xor(key, value) + _GOLDEN, MASK32))


def stream_key(seed: int, step, stream: int) -> torch.Tensor:
    """A 32-bit key for one (seed, step, stream); ``step`` may be a tensor (traced)."""
    key = mix32(torch.tensor(seed & MASK32, dtype=torch.int64))
    key = _mix_in(key, seed >> 32)
    if isinstance(step, torch.Tensor):
        step = step.to(torch.int64).reshape(())
    # ``stream`` may be a 1-D tensor of stream ids: then one key per stream
    key = _mix_in(key, step)
    key = _mix_in(key, stream)
    return key


def _normals(key: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Standard normals for counters ``idx`` under ``key`` (broadcast against each other), float32."""
    base = torch.bitwise_and(mix32(key) * 2, MASK32)  # decorrelate key from counter
    c1 = torch.bitwise_and(base + 2 * idx, MASK32)
    h1 = mix32(torch.bitwise_xor(c1, key))
    h2 = mix32(torch.bitwise_xor(torch.bitwise_and(c1 + 1, MASK32), key))
    # 24 high bits -> exactly representable in float32.
    u1 = (_shr(h1, 8) + 1).to(torch.float32) * (1.0 / (1 << 24))  # (0, 1]
    u2 = _shr(h2, 8).to(torch.float32) * (1.0 / (1 << 24))  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def gaussian(key: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``numel`` standard normals, a deterministic function of ``key``.

    Element i uses counters 2i and 2i+1 under the key; Box-Muller's cosine
    branch turns the two uniform 24-bit draws into one normal.
    """
    return _normals(key, torch.arange(numel, dtype=torch.int64)).to(dtype)


def direction_noise(seed: int, step, stream: int, shape, queries: int, dtype=torch.float32):
    """z for all ``queries`` directions of one tensor: shape ``(queries, *shape)``."""
    numel = queries * math.prod(shape)
    return gaussian(stream_key(seed, step, stream), numel, dtype).reshape(queries, *shape)


def layers_noise(seed: int, step, shapes, queries: int, dtype=torch.float32) -> list[torch.Tensor]:
    """``[direction_noise(seed, step, i, shapes[i], queries, dtype) for i ...]``, batched.

    Tensors of the same shape share one hash/Box-Muller chain over a (tensors, numel)
    grid instead of one chain each: a fixed ~40 ops per distinct shape rather than per
    tensor (fewer kernel launches in eager mode, a much smaller exported graph). The
    integer hashing is exact, so the values are those of :func:`direction_noise`
    (transcendental kernels may round the last bit differently at a vector tail).
    """
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(shapes)
    for shape, streams in groups.items():
        numel = queries * math.prod(shape)
        keys = stream_key(seed, step, torch.tensor(streams, dtype=torch.int64)).reshape(-1, 1)
        z = _normals(keys, torch.arange(numel, dtype=torch.int64)).to(dtype)
        for j, i in enumerate(streams):
            out[i] = z[j].reshape(queries, *shape)
    return out  # type: ignore[return-value]
