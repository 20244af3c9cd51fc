"""vaelab.rng: SplitMix64 keyed streams, their distributions, independence and slicing.

Every statistical test uses fixed keys, so its outcome is fixed; the thresholds are
still set at the stated critical values (5 standard errors unless said otherwise).
"""

import math
import struct

import pytest
import torch

from vaelab import rng

MASK = (1 << 64) - 1


def as_int64(u):
    """The int64 with the bits of u mod 2^64, by struct: a reference for _signed."""
    return struct.unpack("<q", struct.pack("<Q", u & MASK))[0]


def splitmix64_mix(z):
    """SplitMix64's finalizer on Python's unbounded ints (Steele, Lea and Flood; Vigna's C code)."""
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def splitmix64_outputs(seed, n, start=0):
    """Outputs start+1 .. start+n of SplitMix64 seeded with seed (output i: mix(seed + i gamma))."""
    return [as_int64(splitmix64_mix(seed + i * 0x9E3779B97F4A7C15))
            for i in range(start + 1, start + n + 1)]


def chi_square(counts, expected):
    counts = counts.double()
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_limit(df, z=5.0):
    """The chi-square's upper point z standard normal deviates out (Wilson-Hilferty's cube root
    approximation; z=5 is a tail of about 3e-7)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def correlation(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def stream(purpose, n, seed=0):
    """n normal draws of one purpose's key, as a flat float64 tensor."""
    return rng.normal(torch.tensor(rng.key(seed, purpose)), n).double()


@pytest.fixture(scope="module")
def draws():
    """10^6 normal draws: 1000 values for each of 1000 rows, as training's noise is drawn."""
    keys = rng.row_keys(rng.key(0, "test normal"), torch.arange(1000))
    return rng.normal(keys, 1000).double().flatten()


# ---------------------------------------------------------------- the integer primitives

def test_signed_gives_the_int64_with_the_same_bits():
    for u in [0, 1, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1, 2**64, 2**64 + 5, -1, -2**63,
              0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB]:
        assert rng._signed(u) == as_int64(u)
        assert -2**63 <= rng._signed(u) < 2**63


def test_the_module_constants_are_splitmix64s_as_int64():
    assert rng.GAMMA == as_int64(0x9E3779B97F4A7C15)
    assert rng.M1 == as_int64(0xBF58476D1CE4E5B9)
    assert rng.M2 == as_int64(0x94D049BB133111EB)


def test_key_is_an_int64_range_int_of_both_signs():
    keys = [rng.key(seed, "observe", i) for seed in range(3) for i in range(100)]
    assert all(type(k) is int and -2**63 <= k < 2**63 for k in keys)
    assert min(keys) < 0 < max(keys)
    assert torch.tensor(keys).dtype == torch.int64


def test_key_differs_across_seeds_purposes_and_indices():
    indices = [(), (0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (10,), (1, 0, 0)]
    keys = [rng.key(seed, purpose, *index) for seed in (0, 1, 2, 12345)
            for purpose in ("observe", "noise", "order", "evaluate") for index in indices]
    assert len(set(keys)) == len(keys)


def test_key_is_the_same_for_the_same_arguments():
    assert rng.key(3, "noise", 7, 2) == rng.key(3, "noise", 7, 2)


def test_mix_matches_a_python_splitmix64_finalizer():
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([0, 1, -1, 2**63 - 1, -2**63, rng.GAMMA, rng.M1, rng.M2])
    x = torch.cat([edges, torch.randint(-2**63, 2**63 - 1, (500,), generator=g)])
    expected = [as_int64(splitmix64_mix(v)) for v in x.tolist()]
    assert rng.mix(x).tolist() == expected


def test_mix_returns_a_new_tensor_and_leaves_its_input_alone():
    x = torch.arange(-50, 50, dtype=torch.int64) * rng.GAMMA
    before = x.clone()
    out = rng.mix(x)
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr() and not torch.equal(out, x)


def test_row_keys_and_bits_leave_their_inputs_alone():
    index = torch.arange(20, dtype=torch.int64)  # already int64: .to() returns the same tensor
    keys = rng.row_keys(rng.key(0, "rows"), index)
    kept_index, kept_keys = index.clone(), keys.clone()
    rng.row_keys(rng.key(0, "rows"), index)
    rng.bits(keys, 5, start=3)
    rng.normal(keys, 5, start=3)
    rng.uniform16(keys, 5)
    assert torch.equal(index, kept_index) and torch.equal(keys, kept_keys)


# ---------------------------------------------------------------- bits

def test_bits_are_splitmix64s_stream_seeded_with_the_key():
    seeds = [0, 1, -1, 2**63 - 1, -2**63, rng.key(0, "observe", 3), rng.key(5, "noise")]
    for start in (0, 1, 7):
        got = rng.bits(torch.tensor(seeds), 6, start=start)
        assert got.dtype == torch.int64 and got.shape == (len(seeds), 6)
        assert got.tolist() == [splitmix64_outputs(s, 6, start) for s in seeds]


def test_bits_of_key_zero_start_with_splitmix64s_published_first_output():
    # Vigna's splitmix64.c seeded with 0 first returns 0xE220A8397B1DCDAF.
    assert rng.bits(torch.tensor(0), 1).tolist() == [as_int64(0xE220A8397B1DCDAF)]


def test_row_keys_are_the_mix_of_base_plus_index_times_gamma():
    base, index = rng.key(1, "observe", 2), [0, 1, 2, 59999, 10**9]
    got = rng.row_keys(base, torch.tensor(index)).tolist()
    assert got == [as_int64(splitmix64_mix(base + i * 0x9E3779B97F4A7C15)) for i in index]


def test_row_keys_take_any_integer_index_dtype():
    base, index = rng.key(0, "rows"), torch.arange(300)
    expected = rng.row_keys(base, index)
    for dtype in (torch.int32, torch.int16):
        assert torch.equal(rng.row_keys(base, index.to(dtype)), expected)
    assert torch.equal(rng.row_keys(torch.tensor(base), index), expected)  # a key in a tensor


def test_each_of_the_64_bits_is_set_half_the_time():
    words = rng.bits(rng.row_keys(rng.key(0, "bit balance"), torch.arange(1000)), 64).flatten()
    n = words.numel()
    for b in range(64):
        ones = int(torch.bitwise_right_shift(words, b).bitwise_and_(1).sum())
        assert abs(ones / n - 0.5) < 5 * 0.5 / math.sqrt(n), b


def test_bits_never_repeat_across_rows_and_counters():
    # 10^6 64-bit values repeat by chance with probability ~3e-8; overlapping streams (row i + 1
    # a shifted copy of row i, say) would repeat many
    words = rng.bits(rng.row_keys(rng.key(0, "overlap"), torch.arange(1000)), 1000)
    assert torch.unique(words).numel() == words.numel()


def test_the_same_key_gives_the_same_bits_whatever_torchs_global_rng_does():
    keys = rng.row_keys(rng.key(0, "repeat"), torch.arange(8))
    first = rng.bits(keys, 40), rng.normal(keys, 40), rng.uniform16(keys, 40)
    torch.manual_seed(1)
    torch.rand(100)
    second = rng.bits(keys, 40), rng.normal(keys, 40), rng.uniform16(keys, 40)
    torch.manual_seed(2)
    third = rng.bits(keys, 40), rng.normal(keys, 40), rng.uniform16(keys, 40)
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(rng.permutation(rng.key(0, "p"), 50), rng.permutation(rng.key(0, "p"), 50))


def test_drawing_leaves_torchs_global_rng_where_it_was():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    keys = rng.row_keys(rng.key(0, "global"), torch.arange(4))
    rng.bits(keys, 9), rng.normal(keys, 9), rng.uniform16(keys, 9), rng.permutation(5, 9)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- slicing

def test_a_subset_of_row_keys_is_the_same_rows_of_the_whole():
    base = rng.key(0, "observe", 1)
    whole = rng.row_keys(base, torch.arange(1000))
    subset = torch.tensor([999, 0, 417, 418, 3, 417])  # any order, repeats allowed
    assert torch.equal(rng.row_keys(base, subset), whole[subset])
    assert torch.equal(rng.normal(rng.row_keys(base, subset), 33), rng.normal(whole, 33)[subset])
    assert torch.equal(rng.uniform16(rng.row_keys(base, subset), 33),
                       rng.uniform16(whole, 33)[subset])


@pytest.mark.parametrize("start, n", [(0, 1), (1, 1), (3, 37), (64, 64), (1000, 5), (5, 1000)])
def test_bits_with_a_start_are_those_columns_of_a_longer_draw(start, n):
    keys = rng.row_keys(rng.key(0, "slice"), torch.arange(6))
    longer = rng.bits(keys, start + n + 11)
    assert torch.equal(rng.bits(keys, n, start), longer[:, start:start + n])


@pytest.mark.parametrize("start, n", [(0, 1), (1, 1), (3, 37), (64, 64), (1000, 5), (5, 1000)])
def test_normal_with_a_start_is_those_columns_of_a_longer_draw(start, n):
    keys = rng.row_keys(rng.key(0, "slice"), torch.arange(6))
    longer = rng.normal(keys, start + n + 11)
    assert torch.equal(rng.normal(keys, n, start), longer[:, start:start + n])
    one = torch.tensor(rng.key(1, "slice"))  # a single (0-d) key
    assert torch.equal(rng.normal(one, n, start), rng.normal(one, start + n + 3)[start:start + n])


def test_a_normal_draw_split_in_chunks_is_the_whole_draw():
    keys = rng.row_keys(rng.key(0, "chunks"), torch.arange(5))
    whole = rng.normal(keys, 50 * 7)
    chunks = torch.cat([rng.normal(keys, 50, start=50 * i) for i in range(7)], dim=1)
    assert torch.equal(chunks, whole)


def test_uniform16_first_m_columns_do_not_depend_on_n():
    keys = rng.row_keys(rng.key(0, "uniform16"), torch.arange(4))
    for n in range(1, 14):
        whole = rng.uniform16(keys, n)
        assert whole.shape == (4, n) and whole.dtype == torch.int32
        for m in range(1, n + 1):
            assert torch.equal(rng.uniform16(keys, m), whole[:, :m]), (m, n)


def test_uniform16_splits_each_hash_into_four_16_bit_values_low_half_first():
    keys = rng.row_keys(rng.key(0, "halves"), torch.arange(7))
    words = rng.bits(keys, 3).tolist()
    # the 16-bit halves as int16, shifted by 2^15: the unsigned half with its top bit flipped
    expected = [[((w >> (16 * j)) & 0xFFFF) ^ 0x8000 for w in row for j in range(4)][:10]
                for row in words]
    assert rng.uniform16(keys, 10).tolist() == expected


def test_draws_are_the_same_with_one_thread_or_two():
    keys = rng.row_keys(rng.key(0, "threads"), torch.arange(100))
    threads = torch.get_num_threads()
    try:  # 10^5 values per draw: over the grain size, so two threads share the work
        torch.set_num_threads(1)
        one = rng.bits(keys, 1000), rng.normal(keys, 1000), rng.uniform16(keys, 1000)
        torch.set_num_threads(2)
        two = rng.bits(keys, 1000), rng.normal(keys, 1000), rng.uniform16(keys, 1000)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- distributions

def test_uniform16_is_in_range_and_uniform_in_its_high_and_low_bits():
    values = rng.uniform16(rng.row_keys(rng.key(0, "binarize"), torch.arange(200)), 784)
    assert values.min() >= 0 and values.max() < 65536
    assert values.min() < 64 and values.max() >= 65536 - 64  # it reaches both ends
    n = values.numel()
    for bins in (torch.bitwise_right_shift(values, 10), values.bitwise_and(63)):  # 64 bins each
        counts = torch.bincount(bins.flatten(), minlength=64)
        assert chi_square(counts, n / 64) < chi_square_limit(63)


def test_normal_has_mean_0_variance_1_skew_0_and_kurtosis_3(draws):
    n = draws.numel()
    mean = float(draws.mean())
    centred = draws - mean
    variance = float((centred ** 2).mean())
    skew = float((centred ** 3).mean()) / variance ** 1.5
    kurtosis = float((centred ** 4).mean()) / variance ** 2
    # the standard errors of these estimates for normal data
    assert abs(mean) < 5 / math.sqrt(n)
    assert abs(variance - 1) < 5 * math.sqrt(2 / n)
    assert abs(skew) < 5 * math.sqrt(6 / n)
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / n)


def test_normal_passes_a_kolmogorov_smirnov_test_against_the_normal_cdf(draws):
    n = draws.numel()
    cdf = torch.special.ndtr(torch.sort(draws).values)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((i / n - cdf).max()), float((cdf - (i - 1) / n).max()))
    assert d < 1.63 / math.sqrt(n)  # the 1% critical value for large n


def test_normal_fills_100_equally_likely_bins_evenly(draws):
    edges = torch.special.ndtri(torch.arange(1, 100, dtype=torch.float64) / 100)
    counts = torch.bincount(torch.bucketize(draws, edges), minlength=100)
    assert len(counts) == 100
    assert chi_square(counts, draws.numel() / 100) < chi_square_limit(99)


@pytest.mark.parametrize("t", [2.0, 3.0, 4.0])
def test_normal_has_the_right_tail_mass_beyond_t(draws, t):
    n = draws.numel()
    p = 2 * float(torch.special.ndtr(torch.tensor(-t, dtype=torch.float64)))
    fraction = float((draws.abs() > t).double().mean())
    assert abs(fraction - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_normal_is_finite_and_bounded_by_its_smallest_24_bit_uniform(draws):
    # u1 >= 2^-24 (never 0), so |z| <= sqrt(-2 log 2^-24) = sqrt(48 log 2) ~ 5.77
    assert torch.isfinite(draws).all()
    assert float(draws.abs().max()) <= math.sqrt(48 * math.log(2)) * (1 + 1e-6)
    assert rng.normal(torch.tensor(0), 3).dtype == torch.float32


# ---------------------------------------------------------------- independence

def test_two_purposes_draw_uncorrelated_streams():
    n = 2**17
    assert abs(correlation(stream("observe", n), stream("noise", n))) < 5 / math.sqrt(n)


def test_two_seeds_draw_uncorrelated_streams_for_the_same_purpose():
    n = 2**17
    r = correlation(stream("noise", n, seed=0), stream("noise", n, seed=1))
    assert abs(r) < 5 / math.sqrt(n)


def test_adjacent_rows_and_adjacent_counters_are_uncorrelated(draws):
    x = draws.view(1000, 1000)  # row i: row_keys(base, i)
    assert abs(correlation(x[:-1], x[1:])) < 5 / math.sqrt(999 * 1000)
    assert abs(correlation(x[:, :-1], x[:, 1:])) < 5 / math.sqrt(1000 * 999)


def test_the_same_row_of_two_purposes_is_uncorrelated():
    index = torch.arange(500)
    a = rng.normal(rng.row_keys(rng.key(0, "observe", 0), index), 200)
    b = rng.normal(rng.row_keys(rng.key(0, "noise", 0), index), 200)
    assert abs(correlation(a, b)) < 5 / math.sqrt(a.numel())


# ---------------------------------------------------------------- permutation

@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 1000, 60000])
def test_permutation_is_a_permutation_of_range_n(n):
    p = rng.permutation(rng.key(0, "order", n), n)
    assert p.dtype == torch.int64 and p.shape == (n,)
    assert torch.equal(torch.sort(p).values, torch.arange(n))


def test_permutation_is_fixed_by_its_key_and_differs_between_keys():
    a = rng.permutation(rng.key(0, "order", 0), 1000)
    b = rng.permutation(rng.key(0, "order", 1), 1000)
    assert torch.equal(a, rng.permutation(rng.key(0, "order", 0), 1000))
    assert not torch.equal(a, b)
    assert not torch.equal(a, torch.arange(1000))


def test_permutation_of_three_gives_all_six_orders_equally_often():
    n_keys = 2400
    orders = [tuple(rng.permutation(rng.key(0, "order of three", i), 3).tolist())
              for i in range(n_keys)]
    all_orders = sorted(set(orders))
    assert len(all_orders) == 6
    counts = torch.tensor([orders.count(o) for o in all_orders])
    assert chi_square(counts, n_keys / 6) < chi_square_limit(5)


def test_permutation_of_five_puts_each_value_at_each_position_equally_often():
    n_keys = 1000
    perms = torch.stack([rng.permutation(rng.key(0, "order of five", i), 5)
                         for i in range(n_keys)])
    for position in range(5):
        counts = torch.bincount(perms[:, position], minlength=5)
        assert chi_square(counts, n_keys / 5) < chi_square_limit(4), position
