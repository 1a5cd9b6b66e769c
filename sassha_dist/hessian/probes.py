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
two rounds of the 32-bit MurmurHash3 finaliser per *word* of 32 elements (in
int64 tensors, with multiplications split so that no intermediate exceeds
2**49; nothing relies on signed overflow, so CPU and CUDA agree bit for bit).
Element ``i`` takes bit ``i mod 32`` of word ``i // 32``. Hashing words rather
than elements does 1/32 of the integer work: a per-element hash is some 45
int64 passes over memory, more than a forward-backward pass of GPT-2 small
costs on a GPU; here the words are expanded to signs through a 256-entry table,
one gather per element (on one CPU thread, a 125,000-element probe takes
0.17 ms instead of 1.2 ms).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sassha_dist.distributed.strategy import ProbeSegment

__all__ = ["probe_key", "rademacher", "rademacher_ranges", "segment_probes"]

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35
# Elements per chunk (32 per hashed word): the int64 scratch is about 1.5 bytes an element, so a
# chunk costs 384 KB on CPU and 24 MB on accelerators, which want few, large launches. On CPU all
# of tiny GPT-2's 28 probe tensors (124,800 elements) then take one batch: 0.21 ms on one thread,
# against 0.42 ms in two batches of 2**16.
_CPU_CHUNK = 1 << 18
_ACCELERATOR_CHUNK = 1 << 24


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


def _hash_words_(
    h: torch.Tensor, low_key: int | torch.Tensor, high_word: int | torch.Tensor, scratch: torch.Tensor
) -> None:
    """In place: word indices ``h`` to 32 random bits each (as int64 in [0, 2**32)).

    ``h = fmix32(fmix32(lo(h) ^ low_key) ^ high_word)``, with ``low_key`` the key's low word and
    ``high_word`` the word index's high word xor the key's (per entry, or one integer for all).
    """
    h.bitwise_and_(_MASK32).bitwise_xor_(low_key)
    _fmix32_(h, scratch)
    h.bitwise_xor_(high_word)
    _fmix32_(h, scratch)


@functools.lru_cache(maxsize=32)
def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``table[b, t]`` = +1 if bit ``t`` of the byte ``b`` is 0, else -1: a ``[256, 8]`` table."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return (1 - 2 * bits).to(dtype=dtype, device=device)


def _expand_words(words: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The 32 signs of each hashed word, element ``32 j + t`` from bit ``t`` of word ``j`` (1-D).

    Written into ``out`` (contiguous, ``32 * len(words)`` entries) when given.
    """
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=words.device)
    byte_values = (words.unsqueeze(1) >> shifts).bitwise_and_(0xFF).reshape(-1)
    table = _sign_table(dtype, words.device)
    if out is None:
        return torch.index_select(table, 0, byte_values).reshape(-1)
    torch.index_select(table, 0, byte_values, out=out.view(-1, 8))
    return out


def _word_chunks(first: int, count: int, chunk: int):
    """``(start, stop)`` word ranges of at most ``chunk`` words from word ``first`` that never cross
    a multiple of 2**32 in the word index, so its high word is one integer per range."""
    start = 0
    while start < count:
        boundary = ((first + start) // (1 << 32) + 1) * (1 << 32) - first
        stop = min(start + chunk, count, boundary)
        yield start, stop
        start = stop


def _default_chunk(device: torch.device | str | None) -> int:
    return _CPU_CHUNK if torch.device(device or "cpu").type == "cpu" else _ACCELERATOR_CHUNK


def _hashed_words(key: int, first: int, count: int, device: torch.device) -> torch.Tensor:
    """Words ``first .. first + count - 1`` of the probe ``key`` (none crossing a multiple of 2**32)."""
    h = torch.arange(first, first + count, dtype=torch.int64, device=device)
    _hash_words_(h, key & _MASK32, (first >> 32) ^ (key >> 32), torch.empty_like(h))
    return h


def rademacher(
    key: int,
    numel: int,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Entries ``offset .. offset + numel - 1`` of the probe named by ``key``.

    Returns a 1-D tensor of +1/-1 values in ``dtype``. Reshape it to the
    parameter (or shard) it belongs to; entry ``i`` is the probe value of
    the full parameter's flattened element ``offset + i``.

    Element ``i`` is bit ``i mod 32`` of word ``j = i // 32``,
    ``fmix32(fmix32(lo(j) ^ lo(key)) ^ hi(j) ^ hi(key))`` (``lo`` and ``hi`` the 32-bit words),
    mapped to +1 (bit 0) or -1 (bit 1). Words are hashed ``chunk`` elements at a time (default:
    the device's bound); whole words are expanded straight into the result, about 1.5 bytes of
    int64 scratch per element of a chunk.
    """
    if numel < 0 or offset < 0:
        raise ValueError(f"Invalid probe range {numel=}, {offset=}. Both must be >= 0.")
    out = torch.empty(numel, dtype=dtype, device=device)
    if numel == 0:
        return out
    end = offset + numel
    first_full, last_full = -(-offset // 32), end // 32  # whole words: [first_full, last_full)
    words_per_chunk = max(1, (chunk or _default_chunk(out.device)) // 32)
    for start, stop in _word_chunks(first_full, max(0, last_full - first_full), words_per_chunk):
        first = first_full + start
        words = _hashed_words(key, first, stop - start, out.device)
        _expand_words(words, dtype, out=out[first * 32 - offset : (first + stop - start) * 32 - offset])
    # the partial words at either end (or the one word holding the whole range)
    for word in sorted({offset // 32, (end - 1) // 32}):
        lo, hi = max(offset, word * 32), min(end, word * 32 + 32)
        if word < first_full or word >= last_full:
            signs = _expand_words(_hashed_words(key, word, 1, out.device), dtype)
            out[lo - offset : hi - offset] = signs[lo - word * 32 : hi - word * 32]
    return out


def rademacher_ranges(
    ranges: Sequence[tuple[int, int, int]],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    chunk: int | None = None,
) -> list[torch.Tensor]:
    """``[rademacher(key, numel, offset=offset) for key, numel, offset in ranges]``, the same values.

    Ranges of at most ``chunk`` elements (default: the device's bound) are hashed together, a few
    dozen launches for all of them instead of a few dozen per range (a model's biases and norms,
    or a ZeRO partition's many segments); the results are views into one buffer per batch. Longer
    ranges go through :func:`rademacher`.
    """
    out: list[torch.Tensor | None] = [None] * len(ranges)
    cap = chunk or _default_chunk(device)
    batch: list[int] = []
    size = 0
    for i, (key, numel, offset) in enumerate(ranges):
        if numel < 0 or offset < 0:
            raise ValueError(f"Invalid probe range {numel=}, {offset=}. Both must be >= 0.")
        crosses_word = numel and (offset >> 37) != ((offset + numel - 1) >> 37)
        if numel > cap or crosses_word:
            out[i] = rademacher(key, numel, offset=offset, dtype=dtype, device=device, chunk=chunk)
            continue
        if size + numel > cap:
            _hash_batch(ranges, batch, out, dtype, device)
            batch, size = [], 0
        batch.append(i)
        size += numel
    _hash_batch(ranges, batch, out, dtype, device)
    return out  # type: ignore[return-value]


def segment_probes(
    likes: Sequence[torch.Tensor],
    segment_lists: Sequence[list[ProbeSegment]],
    *,
    seed: int,
    refresh: int,
    sample: int,
    rank: int,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Probe ``sample`` of Hessian refresh ``refresh`` for each tensor of ``likes``, from its segments.

    Each tensor is filled from the elements of the full parameters its segments hold, zero
    elsewhere (a shard's padding), in ``dtype`` (default: each tensor's own). All segments are
    drawn in one batched hash per (dtype, device); a tensor that is one whole segment gets a
    view of the drawn values, without a copy.
    """
    requests = [(like, seg) for like, segments in zip(likes, segment_lists, strict=True) for seg in segments]
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, (like, _) in enumerate(requests):
        by_kind.setdefault((dtype or like.dtype, like.device), []).append(i)
    drawn: list[torch.Tensor] = [torch.empty(0)] * len(requests)
    for (kind_dtype, device), members in by_kind.items():
        ranges = [
            (probe_key(seed, refresh, seg.param_index, sample, rank), seg.length, seg.element_offset)
            for seg in (requests[i][1] for i in members)
        ]
        drawn_kind = rademacher_ranges(ranges, dtype=kind_dtype, device=device)
        for i, z in zip(members, drawn_kind, strict=True):
            drawn[i] = z
    probes, pieces = [], iter(drawn)
    for like, segments in zip(likes, segment_lists, strict=True):
        if len(segments) == 1 and segments[0].local_start == 0 and segments[0].length == like.numel():
            probes.append(next(pieces).view_as(like))
            continue
        z = torch.zeros(like.numel(), dtype=dtype or like.dtype, device=like.device)
        for seg in segments:
            z[seg.local_start : seg.local_start + seg.length] = next(pieces)
        probes.append(z.view_as(like))
    return probes


def _hash_batch(
    ranges: Sequence[tuple[int, int, int]],
    batch: list[int],
    out: list[torch.Tensor | None],
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> None:
    """Hash the words of the ranges ``batch`` (none crossing a multiple of 2**32 in the word index)
    in one pass over their concatenation."""
    if not batch:
        return
    first_words = [ranges[i][2] // 32 for i in batch]
    counts = [
        (ranges[i][2] + ranges[i][1] + 31) // 32 - first if ranges[i][1] else 0
        for i, first in zip(batch, first_words, strict=True)
    ]
    starts = list(itertools.accumulate([0, *counts[:-1]]))
    # The per-range integers in one host-to-device copy (a blocking copy waits for the device).
    repeats, word_offsets, low_keys, high_words = torch.tensor(
        [
            counts,
            [first - start for first, start in zip(first_words, starts, strict=True)],
            [ranges[i][0] & _MASK32 for i in batch],
            [(first >> 32) ^ (ranges[i][0] >> 32) for i, first in zip(batch, first_words)],
        ],
        dtype=torch.int64,
        device=device,
    )

    words = sum(counts)

    def per_word(values: torch.Tensor) -> torch.Tensor:
        # output_size: without it repeat_interleave reads the sum of repeats back from the device
        return torch.repeat_interleave(values, repeats, output_size=words)

    # h: the word index of each entry in its own probe (first word + position in its range).
    h = torch.arange(words, dtype=torch.int64, device=device)
    h.add_(per_word(word_offsets))
    low_key = per_word(low_keys)
    high_word = per_word(high_words)
    _hash_words_(h, low_key, high_word, torch.empty_like(h))
    signs = _expand_words(h, dtype)
    for i, start in zip(batch, starts, strict=True):
        _, numel, offset = ranges[i]
        begin = start * 32 + offset % 32
        out[i] = signs[begin : begin + numel]
