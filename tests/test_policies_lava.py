"""LAVa step by step, written from the paper (``docs/design.md``, "Compression") and the reference code's
behaviour (github.com/MGDDestiny/Lava, ``LavaKVCluster.calcul_attn_score`` and the layer
split in ``adaptive_mistral_hijack_lava.py``), independently of lava_sglang's helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lava_sglang.config import CompressionConfig
from lava_sglang.policies import get_policy, select_request


def reference_layer_scores(q, k, v, P, w, kernel, pooling="max"):
    """Steps 1-5 as the reference code does them (repeat_kv, full attention matrix)."""
    wq, hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    kr = k.float().repeat_interleave(g, dim=1).permute(1, 0, 2)  # [Hq, N, D]
    vr = v.float().repeat_interleave(g, dim=1).permute(1, 0, 2)
    qq = q.float().permute(1, 0, 2)  # [Hq, w, D]
    attn = qq @ kr.transpose(1, 2) / math.sqrt(d)  # [Hq, w, N]
    # 1. causal mask inside the window only (the window queries see every earlier key)
    mask = torch.triu(torch.ones(w, w, dtype=torch.bool), diagonal=1)
    attn[:, :, -w:] = attn[:, :, -w:].masked_fill(mask, float("-inf"))
    attn = attn.softmax(-1)
    # 2. mean over the window queries, window keys dropped
    a = attn[:, :, : n - w].mean(dim=1)  # [Hq, N - w]
    # 3. pooling, same length (over the whole non-window range, then the prefix is cut)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    a = pool(a[None], kernel_size=kernel, padding=kernel // 2, stride=1)[0][:, P:]
    # 4. value-norm factor: max L1 norm of the head's private non-window values
    vn = vr[:, P : n - w].abs().sum(-1).max(dim=-1).values  # [Hq]
    a = a * vn[:, None]
    # 5. GQA: max over the group
    return a.view(hkv, g, -1).max(dim=1).values


def reference_entropy(s):
    flat = s.flatten().double().numpy()
    p = flat / flat.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(flat.size))


def ranked(scores_1d):
    """Indices by decreasing score, ties -> lower index (the documented rule)."""
    vals = scores_1d.tolist()
    return sorted(range(len(vals)), key=lambda i: (-vals[i], i))


@pytest.mark.parametrize("P", [0, 9])
@pytest.mark.parametrize("alpha", [0.2, 0.5])
@pytest.mark.parametrize("shape", [(4, 9, 3, 16, 300, 8), (3, 4, 2, 8, 200, 16)])
def test_lava_step_by_step(P, alpha, shape):
    L, hq, hkv, d, N, w = shape
    b = 20
    cfg = CompressionConfig(policy="lava", budget=b + w, window=w, kernel_size=7, pooling="max", floor_alpha=alpha)
    g = torch.Generator().manual_seed(L * 100 + P)
    # layers with different attention sharpness -> different entropies
    q = [torch.randn(w, hq, d, generator=g) * (0.5 + l) for l in range(L)]
    k = [torch.randn(N, hkv, d, generator=g) for _ in range(L)]
    v = [torch.randn(N, hkv, d, generator=g) * torch.rand(1, hkv, 1, generator=g) * 3 for _ in range(L)]
    sel = select_request(cfg, q, k, v, P)
    assert sel.compressed
    n = N - P - w

    # steps 1-5: scores
    ref_scores = [reference_layer_scores(q[l], k[l], v[l], P, w, 7) for l in range(L)]
    for l in range(L):
        torch.testing.assert_close(sel.scores[l], ref_scores[l], rtol=1e-5, atol=1e-9)

    # step 6: normalised entropy; step 7: B_l = T e_l / sum(e), exact integers
    e = [reference_entropy(s) for s in ref_scores]
    assert max(e) - min(e) > 0.05  # the layers really differ
    T = L * hkv * b
    assert sum(sel.layer_budgets) == T
    for bl, el in zip(sel.layer_budgets, e):
        assert abs(bl - T * el / sum(e)) < 1 + 1e-6  # no layer cap binds here (n >> b)

    # step 8: head budgets from the cross-head top-B_l winners with floor alpha
    for l in range(L):
        Bl = sel.layer_budgets[l]
        winners = ranked(sel.scores[l].flatten())[:Bl]
        c = np.bincount([i // n for i in winners], minlength=hkv)
        f = math.floor(Bl / hkv * alpha + 1e-12)
        caps = sel.head_budgets[l]
        assert sum(caps) == Bl and min(caps) >= f
        for cap, ch in zip(caps, c):
            # exact split of what the floor leaves, in proportion to the winner counts ...
            assert abs(cap - (f + (Bl - hkv * f) * ch / Bl)) < 1
            # ... which is the reference's round(c (1 - alpha) + floor(b_l alpha)) up to the
            # floor's fractional part spread over the heads
            assert abs(cap - (ch * (1 - alpha) + f)) < 1 + (Bl / hkv * alpha - f) * hkv

        # step 9: each head keeps its cap_h best tokens plus the window
        for h in range(hkv):
            best = sorted(P + i for i in ranked(sel.scores[l][h])[: caps[h]])
            assert sel.keep[l][h].tolist() == best + list(range(N - w, N))


def test_lava_by_hand():
    """Two layers, two KV heads, four scored keys each, P = 5, w = 2, b = 3, alpha = 0.5."""
    s0 = torch.ones(2, 4)  # flat: entropy 1
    s1 = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # log 2 / log 8 = 1/3
    cfg = CompressionConfig(policy="lava", budget=5, window=2, floor_alpha=0.5)
    sel = get_policy("lava").select(cfg, [s0, s1], prefix_len=5, seq_len=11)
    # T = 2 layers x 2 heads x 3 = 12; shares 12 * (1, 1/3) / (4/3) = 9, 3; layer 0 can hold
    # only 2 x 4 = 8 -> 8, and its surplus moves to layer 1 -> 4.
    assert sel.layer_budgets == [8, 4]
    # layer 0: everything kept; layer 1: winners 1, 1 (head 0) then ties at 0 -> head 0
    # positions 2, 3 (lower head first): c = [4, 0]; b_l = 2, floor(2 x 0.5) = 1 each;
    # the other 2 split 4 : 0 -> [3, 1] (= reference round(4 x 0.5 + 1), round(0 + 1)).
    assert sel.head_budgets == [[4, 4], [3, 1]]
    assert [t.tolist() for t in sel.keep[0]] == [[5, 6, 7, 8, 9, 10]] * 2
    assert [t.tolist() for t in sel.keep[1]] == [[5, 6, 7, 9, 10], [5, 9, 10]]
    assert sel.kept_cells == 2 * 2 * 5


def test_lava_value_norm_moves_budget_between_heads():
    """Same attention in both KV heads, head 1's values 10x larger: head 1 wins the
    cross-head ranking (what the value-norm factor is for); SnapKV-style scores would tie."""
    w, hq, hkv, d, N = 4, 2, 2, 8, 80
    torch.manual_seed(0)
    q1 = torch.randn(w, 1, d)
    k1 = torch.randn(N, 1, d)
    q = [torch.cat([q1, q1], dim=1)]
    k = [torch.cat([k1, k1], dim=1)]
    v1 = torch.randn(N, 1, d)
    v = [torch.cat([v1, 10 * v1], dim=1)]
    cfg = CompressionConfig(policy="lava", budget=24, window=w, floor_alpha=0.2)
    sel = select_request(cfg, q, k, v, 0)
    assert sel.head_budgets[0][1] > sel.head_budgets[0][0]
    assert sel.head_budgets[0][0] >= math.floor(20 * 0.2)
    ada = select_request(CompressionConfig(policy="adakv", budget=24, window=w, floor_alpha=0.2), q, k, v, 0)
    assert ada.head_budgets[0][0] >= ada.head_budgets[0][1]  # identical scores: ties -> head 0
