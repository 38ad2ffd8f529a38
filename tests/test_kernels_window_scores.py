"""Batched window scoring: Triton kernels (interpreter on CPU) vs the torch twin, which is the
policies' own ``attention_scores`` (lava_sglang/policies/scoring.py), and vs the policies'
``score_layer`` for SnapKV (gqa mean) and LAVa (gqa max x value-norm factor).

Tolerance: scores are fp32 means of softmax weights; the kernel and the reference compute
the same logits (fp16/bf16 products are exact in fp32) in a different summation order, so
the comparison is relative to the largest score of the request: 2e-5 (fp32 inputs),
1e-4 (fp16/bf16 inputs; the 16-bit dot of a compiled kernel rounds nothing more than the
reference's fp32 upcast, but the interpreter and the GPU differ in accumulation order).

GPU: ``pytest -m gpu tests/test_kernels*.py`` (see tests/test_kernels_decode.py).
"""

import os

import torch

# Triton kernels on CPU tensors run in Triton's interpreter (lava_sglang/kernels/_triton_utils.py
# picks it per device), whether or not TRITON_INTERPRET=1 is set; the environment is not
# modified here (see the note in tests/test_kernels_decode.py).

import pytest  # noqa: E402

from lava_sglang.config import CompressionConfig  # noqa: E402
from lava_sglang.kernels.window_scores import window_scores, window_scores_torch  # noqa: E402
from lava_sglang.policies import LAVaPolicy, SnapKVPolicy  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}

# (gqa, value_norm, pooling, kernel_size): SnapKV/AdaKV/PyramidKV and LAVa settings and variants
SETTINGS = [
    ("mean", False, "max", 7),
    ("max", True, "max", 7),
    ("mean", False, "avg", 5),
    ("max", True, "avg", 3),
    ("max", False, "max", 1),
]


def make_batch(Ns, Ps, ws, hq, hkv, D, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.cat([torch.randn(w, hq, D, generator=gen) for w in ws] or [torch.zeros(0, hq, D)]).to(dtype)
    S = sum(Ns) + 7
    kb = torch.randn(S, hkv, D, generator=gen).to(dtype)
    vb = torch.randn(S, hkv, D, generator=gen).to(dtype)
    slots = torch.randperm(S, generator=gen)[: sum(Ns)]  # scattered slots, as in the KV pool
    qi = torch.tensor([0] + list(ws)).cumsum(0)
    ki = torch.tensor([0] + list(Ns)).cumsum(0)
    return [t.to(device) for t in (q, qi, kb, vb, slots, ki)] + [torch.tensor(Ps)]


def assert_scores_close(a, b, rel):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == torch.float32 == y.dtype
        if x.numel():
            assert torch.isfinite(y).all()
            scale = x.abs().max().clamp_min(1e-30)
            assert ((x - y).abs().max() / scale).item() <= rel, ((x - y).abs().max() / scale).item()


BATCHES = [
    # Ns, Ps, ws: mixed lengths, prefixes (inside and near the pooling halo), windows
    ([50, 120, 40, 33], [0, 17, 2, 0], [8, 8, 8, 4]),
    ([1, 9, 20], [0, 0, 12], [1, 9, 8]),  # nothing scored, exactly the window, scored = 0
    ([300, 64], [250, 1], [16, 32]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hkv,g", [(2, 1), (1, 3), (2, 4), (1, 8)])
@pytest.mark.parametrize("D", [64, 128])
def test_triton_matches_torch(dtype, hkv, g, D):
    for bi, (Ns, Ps, ws) in enumerate(BATCHES):
        args = make_batch(Ns, Ps, ws, hkv * g, hkv, D, dtype, seed=bi + 10 * g + D)
        # two settings per shape (all settings are covered by test_settings below)
        for gqa, vn, pool, ks in SETTINGS[bi % 3: bi % 3 + 2]:
            kw = dict(kernel_size=ks, pooling=pool, gqa=gqa, value_norm=vn)
            ref = window_scores(*args, **kw, impl="torch")
            out = window_scores(*args, **kw, impl="triton")
            assert [tuple(x.shape) for x in ref] == [(hkv, max(0, n - p - w)) for n, p, w in zip(Ns, Ps, ws)]
            assert_scores_close(ref, out, REL[dtype])


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_settings_and_splits(setting, splits):
    from lava_sglang.kernels._triton_window_scores import window_scores_triton
    from lava_sglang.kernels.window_scores import _lists

    gqa, vn, pool, ks = setting
    Ns, Ps, ws = [200, 90, 45], [30, 0, 3], [16, 32, 8]
    args = make_batch(Ns, Ps, ws, 6, 2, 64, torch.float16, seed=splits)
    kw = dict(kernel_size=ks, pooling=pool, gqa=gqa, value_norm=vn)
    ref = window_scores_torch(*args, **kw)
    out = window_scores_triton(*args[:6], _lists(args[1], args[5], args[6]), **kw, splits=splits)
    assert_scores_close(ref, out, REL[torch.float16])


def test_matches_policy_score_layer():
    """The batched kernel reproduces the policies' per-request score_layer (contiguous keys)."""
    hq, hkv, D, w, N, P = 9, 3, 64, 32, 150, 20
    gen = torch.Generator().manual_seed(7)
    queries = torch.randn(w, hq, D, generator=gen)
    keys = torch.randn(N, hkv, D, generator=gen)
    values = torch.randn(N, hkv, D, generator=gen)
    for policy, name in ((SnapKVPolicy(), "snapkv"), (LAVaPolicy(), "lava")):
        cfg = CompressionConfig(policy=name, budget=64, window=w)
        ref = policy.score_layer(cfg, queries, keys, values, P)
        out = window_scores(
            queries, torch.tensor([0, w]), keys, values, torch.arange(N), torch.tensor([0, N]), [P],
            kernel_size=cfg.kernel_size, pooling=cfg.pooling, gqa=policy.gqa, value_norm=policy.value_norm,
            impl="triton",
        )
        assert_scores_close([ref], out, REL[torch.float32])


def test_empty_batch_and_errors():
    q = torch.zeros(0, 4, 64)
    kb = torch.zeros(5, 2, 64)
    for impl in ("torch", "triton"):
        assert window_scores(q, torch.tensor([0]), kb, None, torch.zeros(0, dtype=torch.long),
                             torch.tensor([0]), [], impl=impl) == []
    args = make_batch([10], [0], [4], 4, 2, 64, torch.float32)
    with pytest.raises(ValueError):
        window_scores(*args, gqa="median")
    with pytest.raises(ValueError):
        window_scores(*args, kernel_size=4)
    with pytest.raises(ValueError):
        window_scores(args[0], args[1], args[2], None, *args[4:], value_norm=True, impl="triton")
    bad = make_batch([3], [0], [4], 4, 2, 64, torch.float32)  # window longer than the sequence
    with pytest.raises(ValueError):
        window_scores(*bad, impl="triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hkv,g,D", [(3, 3, 64), (8, 4, 128), (2, 8, 128)])
def test_gpu_window_scores(dtype, hkv, g, D):
    args = make_batch([2000, 513, 40], [0, 100, 0], [32, 32, 8], hkv * g, hkv, D, dtype, device="cuda")
    for gqa, vn, pool, ks in SETTINGS:
        kw = dict(kernel_size=ks, pooling=pool, gqa=gqa, value_norm=vn)
        ref = window_scores(*args, **kw, impl="torch")
        out = window_scores(*args, **kw, impl="triton")
        torch.cuda.synchronize()
        assert_scores_close(ref, out, 1e-3)
