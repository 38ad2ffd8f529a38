"""lava_sglang.policies.scoring: every scoring step on tiny hand-computed tensors, plus the
chunked (low-memory) path against a naive full-matrix implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lava_sglang.policies import scoring as S


def _naive_window_attention(q, k, P):
    """Straight from the definition: repeat_kv, full [Hq, w, N] logits, causal window mask,
    softmax over all keys, mean over the window queries, columns [P, N - w)."""
    w, hq, d = q.shape
    n, hkv, _ = k.shape
    kr = k.float().repeat_interleave(hq // hkv, dim=1)  # [N, Hq, D]
    logits = torch.einsum("whd,nhd->hwn", q.float(), kr) / math.sqrt(d)
    qpos = torch.arange(n - w, n)
    logits = logits.masked_fill(torch.arange(n)[None, None, :] > qpos[None, :, None], float("-inf"))
    return logits.softmax(-1)[:, :, P : n - w].mean(1)


def test_window_attention_hand():
    # D = 1 (scale 1), w = 2, N = 4: query 2 sees keys 0..2 with exp-logits 1, 2, 3;
    # query 3 sees keys 0..3 with exp-logits 1, 2, 3, 4.
    q = torch.ones(2, 1, 1)
    k = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).view(4, 1, 1)
    a = S.window_attention_mean(q, k, 0)
    expect = torch.tensor([[(1 / 6 + 1 / 10) / 2, (2 / 6 + 2 / 10) / 2]])  # [2/15, 4/15]
    torch.testing.assert_close(a, expect)
    # the prefix key 0 still normalises the softmax but is not scored
    torch.testing.assert_close(S.window_attention_mean(q, k, 1), expect[:, 1:])
    # nothing to score
    assert S.window_attention_mean(q, k, 2).shape == (1, 0)


def test_window_attention_scale_is_inv_sqrt_head_dim():
    # D = 4 -> scale 1/2; q = (2, 0, 0, 0) makes the logit exactly k[..., 0]
    q = torch.zeros(2, 1, 4)
    q[..., 0] = 2.0
    k = torch.zeros(4, 1, 4)
    k[:, 0, 0] = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(S.window_attention_mean(q, k, 0), torch.tensor([[2 / 15, 4 / 15]]))


def test_window_attention_gqa_head_mapping():
    # Hq = 4, Hkv = 2: query heads 0, 1 read KV head 0; heads 2, 3 read KV head 1
    torch.manual_seed(0)
    q = torch.randn(3, 4, 8)
    k = torch.randn(10, 2, 8)
    a = S.window_attention_mean(q, k, 0)
    for h in range(4):
        single = S.window_attention_mean(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], 0)
        torch.testing.assert_close(a[h : h + 1], single)


@pytest.mark.parametrize("shape", [(1, 1, 1, 4, 1), (4, 6, 2, 50, 16), (7, 9, 3, 40, 64), (32, 8, 8, 33, 5), (5, 12, 4, 64, 128)])
@pytest.mark.parametrize("P", [0, 7])
@pytest.mark.parametrize("chunk", [None, 1, 5, 8192])
def test_window_attention_matches_naive(shape, P, chunk):
    w, hq, hkv, n, d = shape
    if P > n - w:
        pytest.skip("prefix longer than the scored range")
    if chunk == 1 and n > 40:
        pytest.skip("one-key chunks only on the small shapes (slow, nothing new)")
    g = torch.Generator().manual_seed(n * 31 + d)
    q = torch.randn(w, hq, d, generator=g) * 2
    k = torch.randn(n, hkv, d, generator=g) * 2
    a = S.window_attention_mean(q, k, P, key_chunk=chunk)
    torch.testing.assert_close(a, _naive_window_attention(q, k, P), rtol=1e-5, atol=1e-7)


def test_window_attention_memory_bound(monkeypatch):
    """Never more than one [Hq, w, min(N, chunk)] fp32 attention buffer per call."""
    sizes = []
    orig = S._window_logits

    def spy(q, keys, lo, hi, n, w, scale):
        out = orig(q, keys, lo, hi, n, w, scale)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(S, "_window_logits", spy)
    w, hq, hkv, d, n = 32, 9, 3, 64, 4096
    q = torch.randn(w, hq, d)
    k = torch.randn(n, hkv, d)
    S.window_attention_mean(q, k, 0)  # default chunk: one pass over N = 4096
    assert max(sizes) == hq * w * n
    sizes.clear()
    S.window_attention_mean(q, k, 0, key_chunk=1024)
    assert max(sizes) == hq * w * 1024


def test_window_attention_dtypes_compute_in_fp32():
    torch.manual_seed(1)
    q = torch.randn(4, 4, 16)
    k = torch.randn(30, 2, 16)
    for dt in (torch.float16, torch.bfloat16):
        a = S.window_attention_mean(q.to(dt), k.to(dt), 2)
        assert a.dtype == torch.float32
        # identical to scoring the rounded values in fp32
        torch.testing.assert_close(a, S.window_attention_mean(q.to(dt).float(), k.to(dt).float(), 2), rtol=0, atol=0)


def test_window_attention_rejects_bad_shapes():
    with pytest.raises(ValueError):
        S.window_attention_mean(torch.randn(2, 3, 4), torch.randn(10, 2, 4))  # 3 % 2 != 0
    with pytest.raises(ValueError):
        S.window_attention_mean(torch.randn(2, 2, 4), torch.randn(10, 2, 8))
    with pytest.raises(ValueError):
        S.window_attention_mean(torch.randn(2, 2, 4), torch.randn(10, 2, 4), 9)


def test_pool_hand():
    x = torch.tensor([[1.0, 5.0, 2.0, 0.0, 3.0]])
    torch.testing.assert_close(S.pool_scores(x, 3, "max"), torch.tensor([[5.0, 5.0, 5.0, 3.0, 3.0]]))
    # zero padding counted in the average (count_include_pad, as F.avg_pool1d / SnapKV)
    torch.testing.assert_close(S.pool_scores(x, 3, "avg"), torch.tensor([[2.0, 8 / 3, 7 / 3, 5 / 3, 1.0]]))
    torch.testing.assert_close(S.pool_scores(x, 1, "max"), x)
    # kernel longer than the row: still same length
    torch.testing.assert_close(S.pool_scores(x[:, :2], 7, "max"), torch.tensor([[5.0, 5.0]]))
    assert S.pool_scores(torch.zeros(2, 0), 7, "max").shape == (2, 0)
    with pytest.raises(ValueError):
        S.pool_scores(x, 4, "max")
    with pytest.raises(ValueError):
        S.pool_scores(x, 3, "median")


def test_pool_matches_snapkv_reference_calls():
    x = torch.rand(3, 40)
    torch.testing.assert_close(S.pool_scores(x, 7, "max"), F.max_pool1d(x[None], 7, padding=3, stride=1)[0])
    torch.testing.assert_close(S.pool_scores(x, 5, "avg"), F.avg_pool1d(x[None], 5, padding=2, stride=1)[0])


def test_value_norm_factor_hand():
    v = torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, -1.0], [10.0, 10.0]]).view(4, 1, 2)
    # window = 1 excludes position 3; L1 norms 3, 3, 2
    torch.testing.assert_close(S.value_norm_factor(v, 0, 1), torch.tensor([3.0]))
    # only the private keys count: positions [2, 3)
    torch.testing.assert_close(S.value_norm_factor(v, 2, 1), torch.tensor([2.0]))
    assert S.value_norm_factor(v, 3, 1).tolist() == [0.0]
    # per KV head
    v2 = torch.stack([v[:, 0], -2 * v[:, 0]], dim=1)
    torch.testing.assert_close(S.value_norm_factor(v2, 0, 1), torch.tensor([3.0, 6.0]))
    assert S.value_norm_factor(v2.half(), 0, 1).dtype == torch.float32


def test_apply_value_norm_and_reduce_gqa_hand():
    s = torch.tensor([[1.0, 4.0], [3.0, 2.0], [5.0, 0.0], [1.0, 1.0]])  # Hq = 4
    torch.testing.assert_close(S.reduce_gqa(s, 2, "mean"), torch.tensor([[2.0, 3.0], [3.0, 0.5]]))
    torch.testing.assert_close(S.reduce_gqa(s, 2, "max"), torch.tensor([[3.0, 4.0], [5.0, 1.0]]))
    torch.testing.assert_close(S.reduce_gqa(s, 4, "max"), s)
    torch.testing.assert_close(S.reduce_gqa(s, 1, "mean"), s.mean(0, keepdim=True))
    torch.testing.assert_close(S.apply_value_norm(s, torch.tensor([10.0, 0.5])),
                               torch.tensor([[10.0, 40.0], [30.0, 20.0], [2.5, 0.0], [0.5, 0.5]]))
    with pytest.raises(ValueError):
        S.reduce_gqa(s, 3, "max")
    with pytest.raises(ValueError):
        S.reduce_gqa(s, 2, "sum")


def test_layer_entropy_hand():
    assert S.layer_entropy(torch.ones(2, 2)) == pytest.approx(1.0)
    assert S.layer_entropy(torch.tensor([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(0.0)
    # two equal entries out of four: log 2 / log 4
    assert S.layer_entropy(torch.tensor([[3.0, 3.0], [0.0, 0.0]])) == pytest.approx(0.5)
    # p = (1/4, 3/4) over 2 entries
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert S.layer_entropy(torch.tensor([[1.0], [3.0]])) == pytest.approx(h)
    # scale-free
    assert S.layer_entropy(torch.tensor([[2.0], [6.0]])) == pytest.approx(h)
    assert S.layer_entropy(torch.ones(1, 1)) == 1.0
    assert S.layer_entropy(torch.zeros(2, 3)) == 1.0


def test_attention_scores_pipeline_and_prefix_halo():
    torch.manual_seed(3)
    w, hq, hkv, d, n = 4, 6, 2, 8, 40
    q, k, v = torch.randn(w, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    for P in (0, 1, 2, 5, 20):
        a = _naive_window_attention(q, k, 0)
        pooled = F.max_pool1d(a[None], 5, padding=2, stride=1)[0][:, P:]
        # SnapKV: mean over the group
        got = S.attention_scores(q, k, v, P, kernel_size=5, pooling="max", gqa="mean", value_norm=False)
        torch.testing.assert_close(got, pooled.view(hkv, 3, -1).mean(1))
        # LAVa: value-norm factor of the private non-window keys, then max over the group
        fac = v[P : n - w].abs().sum(-1).amax(0)
        got = S.attention_scores(q, k, v, P, kernel_size=5, pooling="max", gqa="max", value_norm=True)
        torch.testing.assert_close(got, (pooled * fac.repeat_interleave(3)[:, None]).view(hkv, 3, -1).amax(1))
