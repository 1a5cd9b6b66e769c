"""Counter-based Rademacher probes.

A probe entry is a pure function of ``(seed, hessian_update, param_index,
sample, rank, element_index)``: no generator state is carried between calls.
That gives three properties the optimizer relies on:

* a run reproduces exactly, and a resumed run draws the same probes as an
  uninterrupted one (the only state is the integer ``hessian_update``);
* in global-probe mode (``rank=0`` everywhere) a rank holding a shard of a
  parameter generates exactly its part of the full probe, because the element
  index is the index in the *full, flattened* parameter;
* in per-rank mode each rank draws an independent probe by mixing its rank
  into the key, and rank 0 draws the global probe.

The hash is a 64-bit key schedule (SplitMix64, in Python integers) followed by
two rounds of the 32-bit MurmurHash3 finaliser per element (in int64 tensors,
with multiplications split so that no intermediate exceeds 2**49; nothing
relies on signed overflow, so CPU and CUDA agree bit for bit).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

__all__ = ["probe_key", "rademacher", "rademacher_ranges"]

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35
# Elements hashed per chunk: on CPU a chunk's int64 temporaries should stay in
# cache (measured 10x faster at 2**18 than at 2**22); accelerators want few,
# large launches.
_CPU_CHUNK = 1 << 18
_ACCELERATOR_CHUNK = 1 << 24
# Short ranges are hashed together, up to this many elements per batch. Four int64 buffers of
# the batch's size are live (32 bytes per entry: 2 MB on CPU, 32 MB on accelerators), against two
# of a chunk's size for one long range.
_CPU_BATCH = 1 << 16
_ACCELERATOR_BATCH = 1 << 20


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN64) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def probe_key(seed: int, hessian_update: int, param_index: int, sample: int, rank: int = 0) -> int:
    """Mix the probe's coordinates (all non-negative ints) into one 64-bit key."""
    if seed < 0:
        raise ValueError(f"Invalid probe coordinate seed={seed}. Must be >= 0.")
    key = _splitmix64(seed & _MASK64)
    for name, field in (
        ("hessian_update", hessian_update),
        ("param_index", param_index),
        ("sample", sample),
        ("rank", rank),
    ):
        if field < 0:
            raise ValueError(f"Invalid probe coordinate {name}={field}. Must be >= 0.")
        key = _splitmix64(key ^ ((field * _GOLDEN64) & _MASK64))
    return key


def _xor_shift_(x: torch.Tensor, bits: int, scratch: torch.Tensor) -> None:
    """In place: ``x ^= x >> bits``."""
    torch.bitwise_right_shift(x, bits, out=scratch)
    x.bitwise_xor_(scratch)


def _mul32_(x: torch.Tensor, c: int, scratch: torch.Tensor) -> None:
    """In place: ``x = (x * c) mod 2**32`` for ``0 <= x < 2**32``, without int64 overflow.

    ``x * c = low16(x) * c + high16(x) * c * 2**16``; modulo 2**32 only the low 16 bits of
    ``high16(x) * c`` survive the shift. Every product stays below 2**48.
    """
    torch.bitwise_and(x, 0xFFFF, out=scratch)
    scratch.mul_(c)
    x.bitwise_right_shift_(16).mul_(c).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    x.add_(scratch).bitwise_and_(_MASK32)


def _fmix32_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    """In place: the MurmurHash3 32-bit finaliser of every entry of ``x`` (each in [0, 2**32))."""
    _xor_shift_(x, 16, scratch)
    _mul32_(x, _FMIX_C1, scratch)
    _xor_shift_(x, 13, scratch)
    _mul32_(x, _FMIX_C2, scratch)
    _xor_shift_(x, 16, scratch)


def _signs_(
    h: torch.Tensor, low_key: int | torch.Tensor, high_word: int | torch.Tensor, scratch: torch.Tensor
) -> None:
    """In place: element indices ``h`` to their probe values, +1 or -1 (as int64).

    ``h = fmix32(fmix32(lo(h) ^ low_key) ^ high_word)``, then its top bit: 0 -> +1, 1 -> -1.
    ``low_key`` is the key's low word and ``high_word`` the index's high word xor the key's
    (per entry, or one integer for all).
    """
    h.bitwise_and_(_MASK32).bitwise_xor_(low_key)
    _fmix32_(h, scratch)
    h.bitwise_xor_(high_word)
    _fmix32_(h, scratch)
    h.bitwise_right_shift_(31).mul_(-2).add_(1)


def _chunks(offset: int, numel: int, chunk: int):
    """``(start, stop)`` ranges of at most ``chunk`` entries that never cross a multiple of 2**32
    in the full index ``offset + i``, so the index's high word is one integer per range."""
    start = 0
    while start < numel:
        boundary = ((offset + start) // (1 << 32) + 1) * (1 << 32) - offset
        stop = min(start + chunk, numel, boundary)
        yield start, stop
        start = stop


def rademacher(
    key: int,
    numel: int,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Entries ``offset .. offset + numel - 1`` of the probe named by ``key``.

    Returns a 1-D tensor of +1/-1 values in ``dtype``. Reshape it to the
    parameter (or shard) it belongs to; entry ``i`` is the probe value of
    the full parameter's flattened element ``offset + i``.

    Entry ``i`` is the top bit of ``fmix32(fmix32(lo(i) ^ lo(key)) ^ hi(i) ^ hi(key))`` (``lo``
    and ``hi`` the 32-bit words), mapped to +1 (bit 0) or -1 (bit 1). It is computed chunk by
    chunk in place, in two int64 buffers of the chunk's size (16 bytes per entry at most).
    """
    if numel < 0 or offset < 0:
        raise ValueError(f"Invalid probe range {numel=}, {offset=}. Both must be >= 0.")
    key_low, key_high = key & _MASK32, key >> 32
    out = torch.empty(numel, dtype=dtype, device=device)
    chunk = _CPU_CHUNK if out.device.type == "cpu" else _ACCELERATOR_CHUNK
    hashed = torch.empty(min(chunk, numel), dtype=torch.int64, device=out.device)
    scratch = torch.empty_like(hashed)
    for start, stop in _chunks(offset, numel, chunk):
        first, size = offset + start, stop - start
        h, s = hashed[:size], scratch[:size]
        torch.arange(first, first + size, dtype=torch.int64, device=out.device, out=h)
        _signs_(h, key_low, (first >> 32) ^ key_high, s)
        out[start:stop].copy_(h)
    return out


def rademacher_ranges(
    ranges: Sequence[tuple[int, int, int]],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """``[rademacher(key, numel, offset=offset) for key, numel, offset in ranges]``, the same values.

    Ranges shorter than a batch are hashed together, a few dozen launches for all of them instead
    of a few dozen per range (a model's biases and norms, or a ZeRO partition's many segments);
    the results are views into one buffer per batch. Longer ranges go through :func:`rademacher`.
    """
    out: list[torch.Tensor | None] = [None] * len(ranges)
    cap = _CPU_BATCH if torch.device(device or "cpu").type == "cpu" else _ACCELERATOR_BATCH
    batch: list[int] = []
    size = 0
    for i, (key, numel, offset) in enumerate(ranges):
        if numel < 0 or offset < 0:
            raise ValueError(f"Invalid probe range {numel=}, {offset=}. Both must be >= 0.")
        crosses_word = numel and (offset >> 32) != ((offset + numel - 1) >> 32)
        if numel > cap or crosses_word:
            out[i] = rademacher(key, numel, offset=offset, dtype=dtype, device=device)
            continue
        if size + numel > cap:
            _hash_batch(ranges, batch, out, dtype, device)
            batch, size = [], 0
        batch.append(i)
        size += numel
    _hash_batch(ranges, batch, out, dtype, device)
    return out  # type: ignore[return-value]


def _hash_batch(
    ranges: Sequence[tuple[int, int, int]],
    batch: list[int],
    out: list[torch.Tensor | None],
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> None:
    """Hash the ranges ``batch`` (none crossing a multiple of 2**32) in one pass over their concatenation."""
    if not batch:
        return
    lengths = [ranges[i][1] for i in batch]
    starts = list(itertools.accumulate([0, *lengths[:-1]]))
    counts = torch.tensor(lengths, dtype=torch.int64, device=device)

    def per_entry(values: list[int]) -> torch.Tensor:
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.int64, device=device), counts)

    total = sum(lengths)
    # h: the full-parameter element index of each entry (offset + position in its range).
    h = torch.arange(total, dtype=torch.int64, device=device)
    h.add_(per_entry([ranges[i][2] - start for i, start in zip(batch, starts, strict=True)]))
    low_key = per_entry([ranges[i][0] & _MASK32 for i in batch])
    high_word = per_entry([(ranges[i][2] >> 32) ^ (ranges[i][0] >> 32) for i in batch])
    _signs_(h, low_key, high_word, torch.empty_like(h))
    signs = h.to(dtype)
    for i, start, length in zip(batch, starts, lengths, strict=True):
        out[i] = signs[start : start + length]
