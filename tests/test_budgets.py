"""lava_sglang.budgets: hand-computed splits and seeded properties (exact totals, caps, floors)."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from lava_sglang import budgets as B


# --------------------------------------------------------------------------- apportion


def test_apportion_hand_cases():
    assert B.apportion([1, 2, 3], 12) == [2, 4, 6]
    # 10/3 each: remainders tie -> the lower index gets the extra token
    assert B.apportion([1, 1, 1], 10) == [4, 3, 3]
    assert B.apportion([1, 1, 1], 11) == [4, 4, 3]
    # largest remainder: shares 1.25, 3.75 -> [1, 4]... total 5
    assert B.apportion([1, 3], 5) == [1, 4]
    # a capped item: shares 1, 1, 10 of 12 -> third capped at 5, the other two share 7
    assert B.apportion([1, 1, 10], 12, [5, 5, 5]) == [4, 3, 5]
    # cascading caps: after capping item 2, item 1's share exceeds its cap too
    assert B.apportion([1, 4, 10], 15, [100, 3, 5]) == [7, 3, 5]
    # zero weights split uniformly; zero caps get nothing
    assert B.apportion([0, 0], 3) == [2, 1]
    assert B.apportion([5, 5], 4, [0, 10]) == [0, 4]
    assert B.apportion([], 0) == []
    assert B.apportion([1, 2], 0) == [0, 0]


def test_apportion_float_weights_are_exact():
    # 0.1 + 0.2 != 0.3 in floats; the split must still be exact and symmetric
    assert B.apportion([0.1, 0.2, 0.3], 6) == [1, 2, 3]
    assert B.apportion([1 / 3, 1 / 3, 1 / 3], 9) == [3, 3, 3]


def test_apportion_errors():
    with pytest.raises(ValueError):
        B.apportion([1, 1], 5, [2, 2])
    with pytest.raises(ValueError):
        B.apportion([1, -1], 1)
    with pytest.raises(ValueError):
        B.apportion([1, 1], -1)
    with pytest.raises(ValueError):
        B.apportion([float("nan"), 1], 1)


@pytest.mark.parametrize("seed", range(100))
def test_apportion_properties(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    weights = [rng.choice([0.0, rng.random(), rng.randint(0, 5)]) for _ in range(n)]
    caps = [rng.randint(0, 40) for _ in range(n)] if rng.random() < 0.7 else [10**6] * n
    total = rng.randint(0, min(sum(caps), 500))
    out = B.apportion(weights, total, caps)
    assert sum(out) == total
    assert all(0 <= x <= c for x, c in zip(out, caps))
    # monotone: a heavier item gets at least as much unless it is full
    for i in range(n):
        for j in range(n):
            if weights[i] > weights[j] and out[i] < caps[i]:
                assert out[i] >= out[j], (weights, caps, total, out)
    # without binding caps every item is within one token of its exact share
    if all(c >= total for c in caps):
        wsum = sum(Fraction(repr(float(x))) for x in weights)
        for x, wt in zip(out, weights):
            share = Fraction(total, n) if wsum == 0 else total * Fraction(repr(float(wt))) / wsum
            assert abs(x - share) < 1
    # deterministic
    assert B.apportion(weights, total, caps) == out


# --------------------------------------------------------------------------- layer splits


def test_uniform_layer_budgets():
    assert B.uniform_layer_budgets(4, 3, 96, 1000) == [288] * 4
    assert B.uniform_layer_budgets(2, 3, 96, 50) == [150, 150]


def test_pyramid_hand_integer():
    # L=3, b=10, beta=5: min = 2, max = 18, step = 8 -> [18, 10, 2] per head
    assert B.pyramid_layer_budgets(3, 1, 10, 1000, 5) == [18, 10, 2]
    assert B.pyramid_layer_budgets(3, 2, 10, 1000, 5) == [36, 20, 4]


def test_pyramid_hand_rounding():
    # L=4, b=10, beta=20: min = 0.5, max = 19.5, step = 19/3
    # real [19.5, 13.1667, 6.8333, 0.5] (sum 40) -> floors [19, 13, 6, 0] (38);
    # +1 to the largest remainder (0.8333, layer 2), then the 0.5 tie -> lower layer 0
    assert B.pyramid_layer_budgets(4, 1, 10, 1000, 20) == [20, 13, 7, 0]


def test_pyramid_clamped_by_private_length():
    # max_num = 18 > n_scored = 12 -> max = 12, min = 2b - max = 8 (KVCache-Factory rule)
    assert B.pyramid_layer_budgets(3, 1, 10, 12, 5) == [12, 10, 8]


def test_pyramid_single_layer_and_beta_one():
    assert B.pyramid_layer_budgets(1, 3, 10, 100, 20) == [30]
    # beta = 1: min = max = b, flat
    assert B.pyramid_layer_budgets(5, 2, 7, 100, 1) == [14] * 5


def _factory_pyramid_real(L, b, n_scored, beta):
    """KVCache-Factory's PyramidKVCluster formula in real arithmetic (no // truncation)."""
    min_num = b / beta
    max_num = 2 * b - min_num
    if max_num >= n_scored:
        max_num = n_scored
        min_num = 2 * b - max_num
    steps = (max_num - min_num) / (L - 1)
    return [max_num - l * steps for l in range(L)]


@pytest.mark.parametrize("seed", range(100))
def test_pyramid_properties(seed):
    rng = random.Random(seed)
    L = rng.randint(2, 40)
    hkv = rng.randint(1, 8)
    b = rng.randint(1, 300)
    n_scored = rng.randint(b, 3 * b + 10)
    beta = rng.choice([1.0, 2.0, 5.0, 20.0, rng.uniform(1, 50)])
    out = B.pyramid_layer_budgets(L, hkv, b, n_scored, beta)
    assert sum(out) == L * hkv * b
    assert all(x % hkv == 0 and 0 <= x <= hkv * n_scored for x in out)
    per_head = [x // hkv for x in out]
    assert per_head == sorted(per_head, reverse=True)  # non-increasing with depth
    for got, real in zip(per_head, _factory_pyramid_real(L, b, n_scored, beta)):
        assert abs(got - real) < 1 + 1e-9


def test_entropy_layer_budgets_hand():
    # T = 60 over entropies 1 : 2 : 3
    assert B.entropy_layer_budgets([0.2, 0.4, 0.6], 60, [100] * 3) == [10, 20, 30]
    # layer 2 can hold only 25: the surplus 5 goes to layers 0, 1 in ratio 1:2
    assert B.entropy_layer_budgets([0.2, 0.4, 0.6], 60, [100, 100, 25]) == [12, 23, 25]


# --------------------------------------------------------------------------- head splits


def test_uniform_head_budgets():
    assert B.uniform_head_budgets(288, 3, 1000) == [96, 96, 96]
    assert B.uniform_head_budgets(10, 3, 1000) == [4, 3, 3]
    with pytest.raises(ValueError):
        B.uniform_head_budgets(10, 3, 3)


def test_floor_per_head_exact():
    assert B.floor_per_head(480, 5, 0.2) == 19  # 96 * 0.2 = 19.2
    assert B.floor_per_head(30, 3, 0.7) == 7  # 10 * 0.7 = 7 exactly (float 0.7 < 7/10)
    assert B.floor_per_head(30, 3, 0.0) == 0
    assert B.floor_per_head(30, 3, 1.0) == 10


def test_cross_head_hand():
    s = torch.tensor([[9.0, 8.0, 1.0, 0.0], [7.0, 6.0, 5.0, 4.0]])
    # top-4 over both heads: 9, 8 (head 0), 7, 6 (head 1) -> c = [2, 2]
    assert B.cross_head_budgets(s, 4, 0.0) == [2, 2]
    s = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 0.0, 0.0, 0.0]])
    assert B.cross_head_budgets(s, 4, 0.0) == [4, 0]
    # alpha = 0.5: b_l = 2, floor f = 1; reference round(c (1 - a) + f) = [3, 1]
    assert B.cross_head_budgets(s, 4, 0.5) == [3, 1]
    # alpha = 1: uniform
    assert B.cross_head_budgets(s, 4, 1.0) == [2, 2]


def test_cross_head_exact_rounding_when_reference_drifts():
    # Hkv = 3, B_l = 10, alpha = 0.2: b_l = 10/3, f = floor(0.667) = 0; the reference's
    # round(c * 0.8 + 0) with c = [4, 3, 3] gives [3, 2, 2] = 7 != 10. Ours sums to 10.
    s = torch.tensor([[10.0, 9, 8, 7, 0], [6.0, 5, 4, 0, 0], [3.0, 2, 1, 0, 0]])
    out = B.cross_head_budgets(s, 10, 0.2)
    assert sum(out) == 10
    assert out == [4, 3, 3]


def test_cross_head_ties_go_to_lower_head_then_earlier_position():
    s = torch.ones(2, 3)
    assert B.cross_head_budgets(s, 3, 0.0) == [3, 0]
    assert B.topk_desc(torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0]), 2).tolist() == [1, 2]
    assert B.topk_desc(torch.tensor([float("nan"), 0.0]), 1).tolist() == [1]


@pytest.mark.parametrize("seed", range(80))
def test_cross_head_properties(seed):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    hkv = rng.randint(1, 8)
    n = rng.randint(1, 60)
    bl = rng.randint(0, hkv * n)
    alpha = rng.choice([0.0, 0.2, 0.5, 1.0, rng.random()])
    s = torch.rand(hkv, n, generator=g)
    if rng.random() < 0.3:  # plenty of ties (max-pooling plateaus)
        s = (s * 4).floor()
    out = B.cross_head_budgets(s, bl, alpha)
    assert sum(out) == bl
    f = math.floor(Fraction(bl, hkv) * Fraction(repr(alpha)))
    assert all(min(f, n) <= x <= n for x in out)
    # close to the reference's real value c_h (1 - alpha) + f when b_l * alpha is integral
    winners = B.topk_desc(s.reshape(-1), bl) // n
    c = torch.bincount(winners, minlength=hkv).tolist()
    if Fraction(bl, hkv) * Fraction(repr(alpha)) == f:
        for x, ch in zip(out, c):
            assert abs(x - (ch * (1 - Fraction(repr(alpha))) + f)) < 1
    assert B.cross_head_budgets(s, bl, alpha) == out
