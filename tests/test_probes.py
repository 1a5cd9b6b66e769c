"""Counter-based Rademacher probes: values, sharding, independence, determinism, validation."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from sassha_dist.hessian.probes import probe_key, rademacher, rademacher_ranges

N = 100_000
# For n independent fair +-1 values, a mean (or a mean of products of two independent streams) has standard
# deviation 1/sqrt(n). Five sigma: a false alarm has probability ~6e-7 per check, so a failure means real
# bias or correlation, not bad luck.
FIVE_SIGMA = 5.0 / math.sqrt(N)


def _python_probe(key: int, index: int) -> float:
    """The documented hash in exact Python integer arithmetic (an independent oracle for the int64 code).

    Two rounds of the 32-bit MurmurHash3 finaliser on the element's word ``index // 32``: first on the
    low word of the word index xor the low key word, then on that xor its high word xor the high key
    word; the sign is bit ``index % 32`` of the result.
    """
    mask32 = (1 << 32) - 1

    def fmix32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & mask32
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & mask32
        return x ^ (x >> 16)

    word = index // 32
    h = fmix32((word & mask32) ^ (key & mask32))
    h = fmix32(h ^ (word >> 32) ^ (key >> 32))
    return 1.0 - 2.0 * ((h >> (index % 32)) & 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_values_are_plus_minus_one_and_balanced(dtype):
    z = rademacher(probe_key(0, 0, 0, 0), N, dtype=dtype)
    assert z.dtype == dtype and z.shape == (N,)
    assert torch.all((z == 1) | (z == -1))
    assert abs(float(z.double().mean())) < FIVE_SIGMA


def test_matches_exact_integer_hash_including_high_index_words():
    """The int64 tensor arithmetic equals the hash done in exact Python integers (no overflow reliance)."""
    key = probe_key(123, 4, 5, 6, 7)
    # 70 elements: partial words at both ends and whole words between; 2**37 - 40 crosses the word
    # index's 2**32 boundary, where its high word changes.
    for offset in (0, 1000, 2**31 - 3, 2**32 - 2, 2**37 - 40, 2**40 + 17, 2**62):
        got = rademacher(key, 70, offset=offset, dtype=torch.float64).tolist()
        assert got == [_python_probe(key, offset + i) for i in range(70)], offset
    assert rademacher(key, 3, offset=37, dtype=torch.float64).tolist() == [
        _python_probe(key, i) for i in (37, 38, 39)
    ]  # inside one word


SHARD_KEY = probe_key(9, 2, 3, 1)
FULL_NUMEL = (1 << 18) + 1000  # one 2**18-element CPU chunk and part of a second


@functools.cache
def _full_probe() -> torch.Tensor:
    return rademacher(SHARD_KEY, FULL_NUMEL)


@pytest.mark.parametrize(
    "offset, numel",
    [(0, 0), (0, 1), (0, 777), (777, 1000), (FULL_NUMEL - 1, 1), (5, FULL_NUMEL - 9), (262_140, 10)],
)
def test_shard_equals_slice_of_full_probe(offset, numel):
    """Global mode: a rank holding elements ``offset .. offset+numel`` draws exactly that slice.

    The cases include an empty shard, uneven shards and shards crossing CPU chunk boundaries.
    """
    full = _full_probe()
    assert torch.equal(rademacher(SHARD_KEY, numel, offset=offset), full[offset : offset + numel])


def test_any_sharding_reassembles_the_full_probe():
    key = probe_key(1, 0, 0, 0)
    full = rademacher(key, 10_007)
    bounds = [0, 1, 1, 4096, 5000, 10_007]  # includes an empty shard
    parts = [rademacher(key, b - a, offset=a) for a, b in itertools.pairwise(bounds)]
    assert torch.equal(torch.cat(parts), full)


def test_shards_far_from_zero_are_consistent_and_do_not_wrap():
    key = probe_key(2, 1, 1, 0)
    wide = rademacher(key, 128, offset=2**37 - 64)  # crosses the word index's 2**32 boundary
    assert torch.equal(rademacher(key, 16, offset=2**37 - 8), wide[56:72])
    assert not torch.equal(rademacher(key, 64, offset=2**37), rademacher(key, 64, offset=0))


def test_rank_zero_is_the_global_probe():
    for coords in [(0, 0, 0, 0), (5, 3, 2, 1), (2**40, 10, 7, 3)]:
        assert probe_key(*coords) == probe_key(*coords, rank=0)
        assert torch.equal(rademacher(probe_key(*coords), 1000), rademacher(probe_key(*coords, 0), 1000))


def test_deterministic_across_calls():
    key = probe_key(42, 7, 3, 1, 2)
    assert probe_key(42, 7, 3, 1, 2) == key
    assert torch.equal(rademacher(key, N), rademacher(key, N))
    assert torch.equal(rademacher(key, 10, dtype=torch.float64), rademacher(key, 10, dtype=torch.float64))


BASE = (0, 3, 2, 1, 1)  # seed, hessian_update, param_index, sample, rank
VARIANTS = {
    "seed": (1, 3, 2, 1, 1),
    "hessian_update": (0, 4, 2, 1, 1),
    "param_index": (0, 3, 3, 1, 1),
    "sample": (0, 3, 2, 2, 1),
    "rank": (0, 3, 2, 1, 2),
    "rank 0 (global)": (0, 3, 2, 1, 0),
    "swapped coordinates": (0, 2, 3, 1, 1),
}


@functools.cache
def _base_probe() -> torch.Tensor:
    return rademacher(probe_key(*BASE), N, dtype=torch.float64)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_different_coordinates_give_uncorrelated_probes(name):
    z0 = _base_probe()
    z1 = rademacher(probe_key(*VARIANTS[name]), N, dtype=torch.float64)
    assert probe_key(*BASE) != probe_key(*VARIANTS[name])
    assert abs(float(z1.mean())) < FIVE_SIGMA
    # Independent Rademacher streams: z0 * z1 is again a fair +-1 sequence, its mean ~ N(0, 1/N).
    assert abs(float((z0 * z1).mean())) < FIVE_SIGMA, name


def test_neighbouring_elements_and_shifted_streams_are_uncorrelated():
    """No lag correlation: element i against i+1, and a stream against itself shifted by one."""
    z = rademacher(probe_key(3, 1, 4, 1), N + 1, dtype=torch.float64)
    assert abs(float((z[:-1] * z[1:]).mean())) < FIVE_SIGMA
    # Consecutive Hessian updates of one parameter, and consecutive params of one update, are not shifts
    # of each other (a weak key schedule could make them so).
    a = rademacher(probe_key(0, 0, 0, 0), N + 1, dtype=torch.float64)
    b = rademacher(probe_key(0, 1, 0, 0), N + 1, dtype=torch.float64)
    c = rademacher(probe_key(0, 0, 1, 0), N + 1, dtype=torch.float64)
    for x, y in [(a, b), (a, c), (b, c)]:
        assert abs(float((x[1:] * y[:-1]).mean())) < FIVE_SIGMA
        assert abs(float((x[:-1] * y[1:]).mean())) < FIVE_SIGMA


@pytest.mark.parametrize("position", range(4))
def test_negative_probe_coordinates_raise(position):
    coords = [1, 1, 1, 1]
    coords[position] = -1
    name = ("hessian_update", "param_index", "sample", "rank")[position]
    with pytest.raises(ValueError, match=name):
        probe_key(0, *coords)


@pytest.mark.parametrize("numel, offset", [(-1, 0), (3, -1)])
def test_negative_probe_range_raises(numel, offset):
    with pytest.raises(ValueError, match="numel" if numel < 0 else "offset"):
        rademacher(probe_key(0, 0, 0, 0), numel, offset=offset)


def test_negative_seed_raises():
    """The seed is a probe coordinate too: ``seed & (2**64 - 1)`` would silently alias -1 with 2**64 - 1."""
    with pytest.raises(ValueError, match="seed"):
        probe_key(-1, 0, 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_ranges_equal_one_call_per_range(dtype):
    """rademacher_ranges hashes short ranges together (and long ones, or ones crossing a multiple
    of 2**37 in the index, where the word index's high word changes, one by one): every range gets
    exactly rademacher's values."""
    gen = torch.Generator().manual_seed(3)
    sizes = [0, 1, 7, 64, 1000, 70_000, (1 << 18) + 5]  # the last two: longer than a CPU batch
    offsets = [0, 3, 2**31, 2**37 - 10, 2**37 + 5, 2**40]  # 2**37 - 10, > 10 entries: crosses a high word
    ranges = []
    for _ in range(40):
        i = torch.randint(len(sizes), (), generator=gen)
        j = torch.randint(len(offsets), (), generator=gen)
        key = int(torch.randint(0, 2**62, (), generator=gen))
        ranges.append((key, sizes[int(i)], offsets[int(j)]))
    for (key, numel, offset), got in zip(ranges, rademacher_ranges(ranges, dtype=dtype), strict=True):
        assert torch.equal(got, rademacher(key, numel, offset=offset, dtype=dtype)), (key, numel, offset)


@pytest.mark.parametrize("chunk", [3, 4096])
def test_chunk_size_does_not_change_the_probe(chunk):
    """The hash runs chunk by chunk (short ranges batch by batch); the chunk only bounds its scratch."""
    key = probe_key(5, 2, 1, 0)
    offset = 2**37 - 5000  # the range crosses the word index's 2**32 boundary
    assert torch.equal(
        rademacher(key, 10_007, offset=offset, chunk=chunk), rademacher(key, 10_007, offset=offset)
    )
    ranges = [(key, 3, 0), (key + 1, 5000, 17), (key + 2, 1, 2**32 - 1), (key + 3, 20_000, 9)]
    for (k, numel, off), got in zip(ranges, rademacher_ranges(ranges, chunk=chunk), strict=True):
        assert torch.equal(got, rademacher(k, numel, offset=off))


def test_int8_signs_equal_the_float_probe():
    """Sassha keeps finite-difference probes as int8 signs: the same values in a quarter of fp32's bytes."""
    key = probe_key(0, 3, 2, 1)
    signs = rademacher(key, 5000, dtype=torch.int8)
    assert signs.dtype == torch.int8
    assert torch.equal(signs.to(torch.float32), rademacher(key, 5000))
