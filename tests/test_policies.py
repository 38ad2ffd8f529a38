"""Policies end to end on random tensors: interface, seeded properties over many shapes,
prefix handling, batching, ties, dtypes, per-policy behaviour."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from lava_sglang import budgets as B
from lava_sglang.config import CompressionConfig
from lava_sglang.policies import (
    POLICY_CLASSES,
    Policy,
    Selection,
    get_policy,
    needs_compression,
    select_batch,
    select_request,
)
from lava_sglang.policies.streamingllm import N_SINK

POLICIES = ["streamingllm", "snapkv", "pyramidkv", "adakv", "lava"]


def make_request(L, N, hq, hkv, d, w, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = [(torch.randn(w, hq, d, generator=g) * 1.5).to(dtype) for _ in range(L)]
    k = [(torch.randn(N, hkv, d, generator=g) * 1.5).to(dtype) for _ in range(L)]
    v = [torch.randn(N, hkv, d, generator=g).to(dtype) for _ in range(L)]
    return q, k, v


def same_selection(a: Selection, b: Selection) -> bool:
    if (a.compressed, a.layer_budgets, a.head_budgets) != (b.compressed, b.layer_budgets, b.head_budgets):
        return False
    return all(torch.equal(x, y) for la, lb in zip(a.keep, b.keep) for x, y in zip(la, lb))


def check_selection(sel: Selection, cfg: CompressionConfig, L, hkv, N, P):
    """Invariants every Selection satisfies."""
    w = cfg.window
    assert sel.n_layers == L and sel.n_kv_heads == hkv
    assert len(sel.layer_budgets) == L and len(sel.head_budgets) == L
    window = torch.arange(N - w, N)
    for l in range(L):
        assert sum(sel.head_budgets[l]) == sel.layer_budgets[l]
        for h in range(hkv):
            pos = sel.keep[l][h]
            assert pos.dtype == torch.int64
            assert pos.numel() == len(set(pos.tolist()))
            assert torch.equal(pos, torch.sort(pos).values)
            if pos.numel():
                assert pos.min() >= P and pos.max() < N  # never the shared prefix
            if sel.compressed:
                assert torch.equal(pos[-w:], window)  # the window is always kept
                assert pos.numel() == sel.head_budgets[l][h] + w
            else:
                assert torch.equal(pos, torch.arange(P, N))


# --------------------------------------------------------------------------- interface


def test_get_policy():
    for name in POLICIES:
        p = get_policy(name)
        assert isinstance(p, Policy) and p.name == name
    assert sorted(POLICY_CLASSES) == sorted(POLICIES)
    with pytest.raises(ValueError):
        get_policy("none")
    with pytest.raises(ValueError):
        get_policy("h2o")


def test_needs_compression_boundary():
    cfg = CompressionConfig(policy="snapkv", budget=40, window=8)
    assert not needs_compression(cfg, 0, 40)  # private range == budget (b + w): keep all
    assert needs_compression(cfg, 0, 41)
    assert not needs_compression(cfg, 10, 50)
    assert needs_compression(cfg, 10, 51)
    assert not needs_compression(CompressionConfig(policy="none"), 0, 10_000)
    assert not needs_compression(CompressionConfig(policy="lava", min_prompt_len=2000), 0, 1999)
    assert needs_compression(CompressionConfig(policy="lava", min_prompt_len=2000), 0, 2000)


@pytest.mark.parametrize("policy", POLICIES + ["none"])
def test_short_requests_keep_everything(policy):
    cfg = CompressionConfig(policy=policy, budget=24, window=8)
    q, k, v = make_request(3, 24, 4, 2, 8, 8, seed=1)
    for P in (0, 6, 20, 24):
        sel = select_request(cfg, q, k, v, P)
        assert not sel.compressed
        check_selection(sel, cfg, 3, 2, 24, P)
        assert sel.kept_cells == 3 * 2 * (24 - P) == sel.private_cells
    q, k, v = make_request(3, 60, 4, 2, 8, 8, seed=1)
    for P in (36, 50, 60):
        sel = select_request(cfg, q, k, v, P)
        assert not sel.compressed
        check_selection(sel, cfg, 3, 2, 60, P)


def test_compresses_just_above_the_budget():
    cfg = CompressionConfig(policy="lava", budget=24, window=8)
    q, k, v = make_request(3, 30, 4, 2, 8, 8, seed=1)
    sel = select_request(cfg, q, k, v, 5)  # private range 25 = budget + 1
    assert sel.compressed
    assert sel.kept_cells == 3 * 2 * 24
    check_selection(sel, cfg, 3, 2, 30, 5)


def test_scores_shape_and_dtype():
    cfg = CompressionConfig(policy="snapkv", budget=16, window=4, kernel_size=3)
    q, k, v = make_request(2, 50, 6, 3, 16, 4, seed=2, dtype=torch.bfloat16)
    for name in POLICIES:
        s = get_policy(name).score_layer(cfg, q[0], k[0], v[0], 7)
        assert s.shape == (3, 50 - 7 - 4) and s.dtype == torch.float32
    with pytest.raises(ValueError):
        get_policy("lava").score_layer(cfg, q[0][:3], k[0], v[0], 0)  # wrong window length


# --------------------------------------------------------------------------- properties


def _random_case(seed):
    rng = random.Random(seed)
    hkv = rng.choice([1, 2, 3, 4])
    g = rng.choice([1, 2, 3])
    d = rng.choice([1, 4, 16, 64])
    w = rng.randint(1, 8)
    b = rng.randint(1, 24)
    L = rng.randint(1, 5)
    P = rng.choice([0, 0, rng.randint(1, 30)])
    N = P + w + b + rng.randint(1, 60)
    cfg = CompressionConfig(
        policy=rng.choice(POLICIES),
        budget=b + w,
        window=w,
        pooling=rng.choice(["max", "avg"]),
        kernel_size=rng.choice([1, 3, 5, 7]),
        floor_alpha=rng.choice([0.0, 0.2, 0.5, 1.0, rng.random()]),
        pyramid_beta=rng.choice([1.0, 5.0, 20.0]),
    )
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    return cfg, L, N, hkv * g, hkv, d, P, dtype


@pytest.mark.parametrize("seed", range(80))
def test_random_requests_invariants(seed):
    cfg, L, N, hq, hkv, d, P, dtype = _random_case(seed)
    q, k, v = make_request(L, N, hq, hkv, d, cfg.window, seed, dtype)
    sel = select_request(cfg, q, k, v, P)
    assert sel.compressed
    check_selection(sel, cfg, L, hkv, N, P)
    b = cfg.scored_budget
    # budgets sum exactly: the kept cells equal the total budget (window included)
    assert sum(sel.layer_budgets) == L * hkv * b
    assert sel.kept_cells == L * hkv * cfg.budget
    n_scored = N - P - cfg.window
    for l in range(L):
        assert 0 <= sel.layer_budgets[l] <= hkv * n_scored
        assert sel.scores[l].shape == (hkv, n_scored)
        if cfg.policy in ("adakv", "lava"):  # the floor is respected
            f = B.floor_per_head(sel.layer_budgets[l], hkv, cfg.floor_alpha)
            assert min(sel.head_budgets[l]) >= min(f, n_scored)
        else:
            assert max(sel.head_budgets[l]) - min(sel.head_budgets[l]) <= 1
        # each head keeps its own best tokens: no dropped key outscores a kept one
        for h in range(hkv):
            s = sel.scores[l][h]
            kept = sel.keep[l][h][: sel.head_budgets[l][h]] - P
            mask = torch.ones(n_scored, dtype=torch.bool)
            mask[kept] = False
            if kept.numel() and mask.any():
                assert s[kept].min() >= s[mask].max()
    # deterministic
    assert same_selection(select_request(cfg, q, k, v, P), sel)


@pytest.mark.parametrize("seed", range(30))
def test_prefix_only_changes_eligibility(seed):
    """Growing the shared prefix from P1 to P2 leaves every private key's score unchanged
    (LAVa: up to its per-head value-norm factor, taken over the private keys) and only
    removes keys from the candidates."""
    cfg, L, N, hq, hkv, d, _, dtype = _random_case(seed)
    rng = random.Random(seed + 1000)
    w = cfg.window
    P1 = rng.randint(0, 10)
    P2 = P1 + rng.randint(1, 12)
    N = max(N, P2 + cfg.budget + 5)
    q, k, v = make_request(L, N, hq, hkv, d, w, seed, dtype)
    pol = get_policy(cfg.policy)
    for l in range(L):
        s1 = pol.score_layer(cfg, q[l], k[l], v[l], P1)
        s2 = pol.score_layer(cfg, q[l], k[l], v[l], P2)
        if cfg.policy == "lava":
            from lava_sglang.policies.scoring import value_norm_factor

            f1 = value_norm_factor(v[l], P1, w)[:, None]
            f2 = value_norm_factor(v[l], P2, w)[:, None]
            torch.testing.assert_close(s2 / f2, s1[:, P2 - P1 :] / f1, rtol=1e-5, atol=1e-9)
        else:
            torch.testing.assert_close(s2, s1[:, P2 - P1 :], rtol=1e-6, atol=0)
    if cfg.policy in ("snapkv", "streamingllm"):
        # uniform budgets: P2's selection is the top-b of P1's scores restricted to >= P2
        sel2 = select_request(cfg, q, k, v, P2)
        for l in range(L):
            s1 = pol.score_layer(cfg, q[l], k[l], v[l], P1)[:, P2 - P1 :]
            for h in range(hkv):
                top = B.topk_desc(s1[h], sel2.head_budgets[l][h])
                assert set((top + P2).tolist()) <= set(sel2.keep[l][h].tolist())


def test_batch_equals_alone():
    reqs, cfgs = [], []
    for seed in range(6):
        rng = random.Random(seed)
        N = rng.randint(20, 90)
        P = rng.choice([0, 5, N - 25])
        reqs.append((*make_request(3, N, 6, 3, 8, 8, seed), P))
    for policy in POLICIES:
        cfg = CompressionConfig(policy=policy, budget=20, window=8, kernel_size=5)
        batch = select_batch(cfg, reqs)
        assert len(batch) == len(reqs)
        for r, sel in zip(reqs, batch):
            alone = select_request(cfg, *r)
            assert same_selection(sel, alone)
            assert sel.compressed == (r[1][0].shape[0] - r[3] > 20)


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "adakv", "lava"])
def test_ties_prefer_lower_index(policy):
    """All keys identical -> every private key scores the same: the earliest positions win,
    and in the cross-head ranking the lower KV head wins."""
    L, N, hq, hkv, d, w, P = 2, 60, 4, 2, 8, 4, 3
    cfg = CompressionConfig(policy=policy, budget=14, window=w, floor_alpha=0.2, kernel_size=3)
    q = [torch.randn(w, hq, d) for _ in range(L)]
    k = [torch.ones(N, hkv, d) for _ in range(L)]
    v = [torch.ones(N, hkv, d) for _ in range(L)]
    sel = select_request(cfg, q, k, v, P)
    for l in range(L):
        for h in range(hkv):
            n = sel.head_budgets[l][h]
            assert sel.keep[l][h][:n].tolist() == list(range(P, P + n))
    if policy in ("adakv", "lava"):
        # winners all go to head 0; head 1 keeps only the floor floor(10 * 0.2) = 2
        assert sel.head_budgets[0] == [18, 2]
    assert same_selection(select_request(cfg, q, k, v, P), sel)


def test_pooling_plateau_ties_are_deterministic():
    """Max pooling produces plateaus of equal scores; the lower position wins."""
    s = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0]])
    cfg = CompressionConfig(policy="snapkv", budget=5, window=2, kernel_size=3)
    pooled = torch.nn.functional.max_pool1d(s[None], 3, padding=1, stride=1)[0]
    sel = get_policy("snapkv").select(cfg, [pooled], 0, 12)
    # plateau of 1.0 at 1, 2, 3 (all kept), then the 0.5 plateau 6, 7, 8 -> lowest first: 6
    assert sel.keep[0][0].tolist() == [1, 2, 3, 10, 11]
    cfg = CompressionConfig(policy="snapkv", budget=6, window=2, kernel_size=3)
    assert get_policy("snapkv").select(cfg, [pooled], 0, 12).keep[0][0].tolist() == [1, 2, 3, 6, 10, 11]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
def test_half_precision_inputs_score_in_fp32(dtype, policy):
    cfg = CompressionConfig(policy=policy, budget=20, window=6)
    q, k, v = make_request(3, 80, 6, 2, 32, 6, seed=5, dtype=dtype)
    sel = select_request(cfg, q, k, v, 4)
    up = select_request(cfg, [x.float() for x in q], [x.float() for x in k], [x.float() for x in v], 4)
    assert same_selection(sel, up)
    assert all(s.dtype == torch.float32 for s in sel.scores)


def test_rejects_inconsistent_inputs():
    cfg = CompressionConfig(policy="snapkv", budget=20, window=6)
    q, k, v = make_request(2, 80, 6, 2, 32, 6, seed=5)
    with pytest.raises(ValueError):
        select_request(cfg, q[:1], k, v, 0)
    with pytest.raises(ValueError):
        select_request(cfg, q, k, v, 81)
    with pytest.raises(ValueError):
        select_request(cfg, q, [k[0], k[1][:50]], v, 0)
    with pytest.raises(ValueError):
        select_request(CompressionConfig(policy="snapkv", budget=6, window=6), q, k, v, 0)  # invalid config


# --------------------------------------------------------------------------- per policy


@pytest.mark.parametrize("P,expect_sinks", [(0, [0, 1, 2, 3]), (2, [2, 3]), (4, []), (10, [])])
def test_streamingllm_sinks_and_recency(P, expect_sinks):
    L, N, w, b = 2, 100, 8, 12
    cfg = CompressionConfig(policy="streamingllm", budget=b + w, window=w)
    q, k, v = make_request(L, N, 4, 2, 8, w, seed=0)
    sel = select_request(cfg, q, k, v, P)
    recent = list(range(N - w - (b - len(expect_sinks)), N - w))
    for l in range(L):
        for h in range(2):
            assert sel.keep[l][h].tolist() == expect_sinks + recent + list(range(N - w, N))
    assert N_SINK == 4


def test_streamingllm_budget_smaller_than_sinks():
    cfg = CompressionConfig(policy="streamingllm", budget=10, window=8)  # b = 2
    q, k, v = make_request(1, 50, 2, 1, 4, 8, seed=0)
    assert select_request(cfg, q, k, v, 0).keep[0][0].tolist() == [0, 1] + list(range(42, 50))


def test_pyramidkv_decreasing_layers():
    L = 6
    cfg = CompressionConfig(policy="pyramidkv", budget=40, window=8, pyramid_beta=4)
    q, k, v = make_request(L, 300, 4, 2, 8, 8, seed=0)
    sel = select_request(cfg, q, k, v, 0)
    per_head = [x // 2 for x in sel.layer_budgets]
    # b = 32, beta 4: min 8, max 56, step 9.6 -> 56, 46.4, 36.8, 27.2, 17.6, 8 (sum 192)
    assert per_head == [56, 46, 37, 27, 18, 8]
    assert all(h == [x, x] for h, x in zip(sel.head_budgets, per_head))


def test_snapkv_uniform_and_adakv_adaptive():
    q, k, v = make_request(3, 200, 6, 3, 16, 8, seed=4)
    snap = select_request(CompressionConfig(policy="snapkv", budget=40, window=8), q, k, v, 0)
    assert all(h == [32, 32, 32] for h in snap.head_budgets)
    ada = select_request(CompressionConfig(policy="adakv", budget=40, window=8, floor_alpha=0.2), q, k, v, 0)
    assert ada.layer_budgets == [96, 96, 96]
    assert any(len(set(h)) > 1 for h in ada.head_budgets)
    # alpha = 1 is uniform: identical to SnapKV
    ada1 = select_request(CompressionConfig(policy="adakv", budget=40, window=8, floor_alpha=1.0), q, k, v, 0)
    assert same_selection(ada1, snap)


def test_lava_layer_budgets_follow_entropy():
    """Select straight from scores: a flat layer (high entropy) gets more than a peaked one."""
    hkv, n = 2, 50
    flat = torch.ones(hkv, n)
    peaked = torch.full((hkv, n), 1e-3)
    peaked[:, :3] = 1.0
    cfg = CompressionConfig(policy="lava", budget=18, window=8)  # b = 10, T = 2 * 2 * 10 = 40
    pol = get_policy("lava")
    sel = pol.select(cfg, [flat, peaked], 0, n + 8)
    e = [pol.layer_entropies([flat])[0], pol.layer_entropies([peaked])[0]]
    assert e[0] == pytest.approx(1.0) and e[1] < 0.5
    real = [40 * x / sum(e) for x in e]
    assert sum(sel.layer_budgets) == 40
    assert all(abs(got - r) < 1 for got, r in zip(sel.layer_budgets, real))
    assert sel.layer_budgets[0] > sel.layer_budgets[1]


def test_lava_layer_cap_redistributes_surplus():
    """A layer whose entropy share exceeds what it can hold is filled and the rest moves."""
    hkv, n = 2, 12
    flat = torch.ones(hkv, n)
    peaked = torch.full((hkv, n), 1e-6)
    peaked[:, 0] = 1.0
    cfg = CompressionConfig(policy="lava", budget=18, window=8)  # b = 10, T = 40, cap 24/layer
    sel = get_policy("lava").select(cfg, [flat, peaked], 0, n + 8)
    assert sel.layer_budgets == [24, 16]
    assert sel.head_budgets[0] == [12, 12]
    assert sel.kept_cells == 2 * 2 * 18


def test_head_caps_never_exceed_private_length():
    """A layer budget that fills every head: each head gets exactly n (no head over its
    private length), whatever the winners and the floor."""
    hkv, n = 3, 10
    s = torch.full((hkv, n), 1e-3)
    s[0] = 1.0
    for alpha in (0.0, 0.2, 0.9, 1.0):
        assert B.cross_head_budgets(s, hkv * n, alpha) == [n] * hkv
        out = B.cross_head_budgets(s, 24, alpha)  # c = [10, 10, 4] (ties -> lower head)
        assert sum(out) == 24 and max(out) <= n
    assert B.cross_head_budgets(s, 24, 0.0) == [10, 10, 4]


def test_selection_helpers():
    cfg = CompressionConfig(policy="adakv", budget=12, window=4)
    q, k, v = make_request(2, 40, 4, 2, 8, 4, seed=0)
    sel = select_request(cfg, q, k, v, 3)
    assert sel.kept_per_layer == [24, 24]
    assert sel.kept_cells == 48
    assert sel.private_cells == 2 * 2 * 37
    assert sel.window_len == 4 and sel.prefix_len == 3 and sel.seq_len == 40 and sel.policy == "adakv"
