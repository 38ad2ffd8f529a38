"""Decode attention over per-(request, KV head) cell lists, the shared index builder and the
implementation dispatch.

* torch twin vs a naive per-pair loop (``F.scaled_dot_product_attention`` per pair, fp32);
* Triton kernel (split-K + reduce) vs the same naive reference, in the Triton interpreter
  on CPU tensors;
* the index builder vs a Python loop, and end to end on a fake SGLang KV pool
  ``[slots, Hkv, D]`` with ``req_to_token`` rows, shared prefix, compressed cells and
  decode tokens.

Tolerances (outputs are compared with the fp32 naive reference on inputs of the tested
dtype, |output| <~ 3): fp32 1e-5 abs + 1e-5 rel; fp16 3e-3 abs + 3e-3 rel (the output is
rounded to fp16, half an ulp at 2..4 is 1e-3; the Triton dot also rounds the softmax
weights to fp16); bf16 2.5e-2 abs + 2e-2 rel (same with an 8-bit mantissa).

GPU: tests marked ``gpu`` run the compiled Triton kernels and the FlashInfer path on CUDA
tensors against the torch twin; they are skipped without CUDA. On a GPU machine::

    pytest -m gpu tests/test_kernels*.py -q

(without ``TRITON_INTERPRET`` in the environment, so Triton compiles for the device).

The Triton interpreter. ``TRITON_INTERPRET=1`` is read by triton 3.8 when a function is
decorated (``triton.jit`` returns an ``InterpretedFunction`` instead of a ``JITFunction``),
including Triton's own standard-library helpers (``tl.max``, ``tl.sum``, ``tl.cdiv``) at the
first import of ``triton.language``. The kernels of this package are therefore wrapped per
device on first use (``lava_sglang/kernels/_triton_utils.kernel``): CPU tensors always go
through the interpreter, with or without the variable. These test modules do not set it:
setting it for the whole session leaks into the SGLang servers other tests spawn, and
setting it only around the first import of Triton breaks Triton modules imported lazily
later (triton/experimental/gluon asserts that the flag is still on). Both modes are
tested: the session itself runs without the variable (unless the caller sets it), and
``test_interpreter_env_mode`` runs the three kernels in a fresh process with
``TRITON_INTERPRET=1``.
"""

import os

import torch

# Triton kernels on CPU tensors run in Triton's interpreter (lava_sglang/kernels/_triton_utils.py
# picks it per device), whether or not TRITON_INTERPRET=1 is set; the environment is not
# modified here (see the note in tests/test_kernels_decode.py).

import math  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lava_sglang.kernels import dispatch  # noqa: E402
from lava_sglang.kernels.decode_attention import paged_decode_attention, paged_decode_attention_torch  # noqa: E402
from lava_sglang.kernels.pair_indices import (  # noqa: E402
    PairIndices,
    append_pair_cells,
    build_pair_indices,
    build_pair_indices_from_lists,
    gather_row_ranges,
)

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def naive_decode(q, k_flat, v_flat, indptr, indices, scale):
    """One F.scaled_dot_product_attention per pair, fp32; zeros for empty lists."""
    n, g, D = q.shape
    out = torch.zeros((n, g, D), dtype=torch.float32)
    indptr = indptr.cpu().long()
    for p in range(n):
        idx = indices[indptr[p]: indptr[p + 1]].cpu().long()
        if idx.numel() == 0:
            continue
        K = k_flat.cpu()[idx].float()[None].expand(g, -1, -1)  # [g, S, D]
        V = v_flat.cpu()[idx].float()[None].expand(g, -1, -1)
        out[p] = F.scaled_dot_product_attention(q[p].cpu().float()[:, None, :], K, V, scale=scale)[:, 0]
    return out


def make_case(lens, g, D, dtype, C=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    C = C or max(8, 2 * sum(lens))
    q = torch.randn(len(lens), g, D, generator=gen).to(dtype)
    k = torch.randn(C, D, generator=gen).to(dtype)
    v = torch.randn(C, D, generator=gen).to(dtype)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(lens, dtype=torch.long).cumsum(0)
    # random cells, with repeats allowed across pairs
    indices = torch.randint(0, C, (sum(lens),), generator=gen)
    return [t.to(device) for t in (q, k, v, indptr, indices)]


LEN_SETS = [
    [0],
    [1],
    [0, 1, 0],
    [5, 0, 17, 1, 64],
    [300, 2, 0, 33],
    [129, 128, 127, 31],
]


# ---------------------------------------------------------------------------- torch twin
@pytest.mark.parametrize("single_shot", [True, False], ids=["single-shot", "key-chunks"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_torch_twin_matches_naive(dtype, g, D, single_shot, monkeypatch):
    import lava_sglang.kernels.decode_attention as decode_module

    # small batches take the padded single-shot path; force the chunked online softmax too
    if not single_shot:
        monkeypatch.setattr(decode_module, "_SINGLE_SHOT_ELEMS", 0)
    for i, lens in enumerate(LEN_SETS):
        q, k, v, indptr, indices = make_case(lens, g, D, dtype, seed=i)
        scale = 1 / math.sqrt(D)
        ref = naive_decode(q, k, v, indptr, indices, scale)
        for chunk in (13, 512):
            out = paged_decode_attention_torch(q, k, v, indptr, indices, scale, key_chunk=chunk)
            assert out.dtype == dtype and out.shape == q.shape
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.float(), ref, **TOL[dtype])
        empty = torch.tensor(lens) == 0
        assert (out[empty] == 0).all()


def test_single_shot_groups_uneven_lists_and_matches_naive():
    """LAVa-like per-head lists (a few long, most short) are padded in groups of similar length,
    not all to the longest; the output is the same attention."""
    from lava_sglang.kernels.decode_attention import _pad_groups

    lens = [700, 650, 260, 240, 120, 110, 100, 60, 55, 50, 40, 30, 20, 9, 3, 1]
    groups = _pad_groups(lens, 0, len(lens))
    assert len(groups) > 1 and groups[0][0] == 0 and groups[-1][1] == len(lens)
    assert all(a < b == c for (a, b), (c, _) in zip(groups, groups[1:] + [(groups[-1][1], None)]))
    padded = sum((b - a) * lens[a] for a, b in groups)
    assert padded < 0.5 * len(lens) * lens[0]
    assert _pad_groups([128] * 12, 0, 12) == [(0, 12)]  # even lists: one group
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, indptr, indices = make_case(lens[::-1], 3, 64, dtype, seed=7)  # unsorted input order
        ref = naive_decode(q, k, v, indptr, indices, 0.125)
        torch.testing.assert_close(paged_decode_attention_torch(q, k, v, indptr, indices, 0.125).float(), ref, **TOL[dtype])


def test_torch_twin_int64_indptr_and_int32_indices():
    q, k, v, indptr, indices = make_case([3, 0, 40], 4, 64, torch.float32)
    ref = paged_decode_attention_torch(q, k, v, indptr, indices, 0.125)
    out = paged_decode_attention(q, k, v, indptr.long(), indices.int(), 0.125, impl="torch")
    torch.testing.assert_close(out, ref)


def test_empty_batch_and_all_empty():
    q, k, v, indptr, indices = make_case([0, 0], 3, 64, torch.float16)
    for impl in ("torch", "triton"):
        out = paged_decode_attention(q, k, v, indptr, indices, 0.125, impl=impl)
        assert out.shape == q.shape and (out == 0).all()
        q0 = q[:0]
        out0 = paged_decode_attention(q0, k, v, torch.zeros(1, dtype=torch.int32), indices[:0], 0.125, impl=impl)
        assert out0.shape == (0, 3, 64)


def test_auto_on_cpu_is_torch():
    q, k, v, indptr, indices = make_case([4, 9], 2, 64, torch.float32)
    out = paged_decode_attention(q, k, v, indptr, indices, 0.125)
    ref = paged_decode_attention_torch(q, k, v, indptr, indices, 0.125)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------- Triton (interpreter)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_triton_matches_naive(dtype, g, D):
    from lava_sglang.kernels._triton_decode import paged_decode_attention_triton

    lens = [0, 1, 37, 200, 3]
    q, k, v, indptr, indices = make_case(lens, g, D, dtype, seed=g * 1000 + D)
    scale = 1 / math.sqrt(D)
    ref = naive_decode(q, k, v, indptr, indices, scale)
    out = paged_decode_attention(q, k, v, indptr, indices, scale, impl="triton")
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    assert (out[0] == 0).all()
    # fixed split counts, including more splits than tiles (empty pieces) and one split
    for splits in (1, 3, 16):
        out = paged_decode_attention_triton(q, k, v, indptr, indices, scale, num_splits=splits)
        torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("lens", LEN_SETS)
def test_triton_length_sets(lens):
    q, k, v, indptr, indices = make_case(lens, 4, 64, torch.float16, seed=len(lens))
    ref = naive_decode(q, k, v, indptr, indices, 0.125)
    out = paged_decode_attention(q, k, v, indptr.long(), indices.int(), 0.125, impl="triton")
    torch.testing.assert_close(out.float(), ref, **TOL[torch.float16])


def test_triton_strided_q_and_kv_views():
    """q as a view of SGLang's [bs, Hq, D] (pairs = bs*Hkv rows of g heads), k/v as flat
    views of [slots, Hkv, D] pools."""
    bs, hkv, g, D, slots = 3, 2, 4, 64, 50
    gen = torch.Generator().manual_seed(3)
    qfull = torch.randn(bs, hkv * g, D, generator=gen, dtype=torch.float32)
    kbuf = torch.randn(slots, hkv, D, generator=gen)
    vbuf = torch.randn(slots, hkv, D, generator=gen)
    q = qfull.view(bs, hkv, g, D).reshape(bs * hkv, g, D)
    lens = [5, 0, 12, 30, 1, 7]
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(lens).cumsum(0)
    indices = torch.randint(0, slots * hkv, (sum(lens),), generator=gen)
    ref = naive_decode(q, kbuf.view(-1, D), vbuf.view(-1, D), indptr, indices, 0.1)
    for impl in ("torch", "triton"):
        out = paged_decode_attention(q, kbuf.view(-1, D), vbuf.view(-1, D), indptr, indices, 0.1, impl=impl)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


# ---------------------------------------------------------------------------- index builder
def loop_pair_lists(H, prefix, mids, suffix):
    lists = []
    for r in range(len(prefix)):
        for h in range(H):
            cells = [int(s) * H + h for s in prefix[r]]
            if mids[r] is not None:
                cells += [int(c) for c in mids[r][h]]
            cells += [int(s) * H + h for s in suffix[r]]
            lists.append(cells)
    return lists


def check_pairs(pairs: PairIndices, lists):
    indptr = pairs.kv_indptr.tolist()
    assert pairs.kv_indptr.dtype == torch.int32
    assert len(indptr) == len(lists) + 1
    for p, cells in enumerate(lists):
        assert pairs.kv_indices[indptr[p]: indptr[p + 1]].tolist() == cells


@pytest.mark.parametrize("H", [1, 3, 8])
def test_build_pair_indices_matches_loop(H):
    gen = torch.Generator().manual_seed(H)
    R = 4
    prefix, mids, suffix = [], [], []
    for r in range(R):
        P = [0, 5, 1, 12][r]
        prefix.append(torch.randint(1, 1000, (P,), generator=gen))
        if r % 2 == 0:
            mids.append([torch.randint(0, 1000 * H, (int(torch.randint(0, 9, (1,), generator=gen)),), generator=gen)
                         for _ in range(H)])
        else:
            mids.append(None)
        suffix.append(torch.randint(1, 1000, ([3, 0, 2, 1][r],), generator=gen))
    lists = loop_pair_lists(H, prefix, mids, suffix)
    for dt in (torch.int64, torch.int32):
        pairs = build_pair_indices_from_lists(H, prefix, mids, suffix, index_dtype=dt)
        assert pairs.kv_indices.dtype == dt
        check_pairs(pairs, lists)
    # no compressed request / no suffix at all
    check_pairs(build_pair_indices_from_lists(H, prefix), loop_pair_lists(H, prefix, [None] * R, [[]] * R))
    # empty batch
    empty = build_pair_indices_from_lists(H, [])
    assert empty.kv_indptr.tolist() == [0] and empty.kv_indices.numel() == 0


def test_append_pair_cells_adds_one_cell_at_the_end_of_every_list():

    lists = [[5, 6], [], [7], [8, 9, 10]]
    for dt in (torch.int64, torch.int32):
        pairs = build_pair_indices_from_lists(1, [torch.tensor(x, dtype=torch.long) for x in lists], index_dtype=dt)
        grown = append_pair_cells(pairs, torch.tensor([50, 51, 52, 53]))
        assert grown.kv_indices.dtype == dt and grown.kv_indptr.dtype == pairs.kv_indptr.dtype
        check_pairs(grown, [x + [50 + i] for i, x in enumerate(lists)])
    with pytest.raises(ValueError, match="4 pairs"):
        append_pair_cells(pairs, torch.tensor([1, 2]))


def test_gather_row_ranges():
    req_to_token = torch.arange(5 * 20).view(5, 20) + 1000
    slots, lens = gather_row_ranges(req_to_token, [3, 0, 4], [2, 5, 7], [6, 5, 8])
    assert lens.tolist() == [4, 0, 1]
    assert slots.tolist() == [1062, 1063, 1064, 1065, 1087]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("hkv,g", [(3, 3), (2, 4), (1, 8), (4, 1)])
def test_end_to_end_pool_layout(impl, hkv, g):
    """Three requests in a fake pool: compressed with a shared prefix, compressed without
    prefix, uncompressed. Each pair's list is built from req_to_token; the result must
    equal attention over the same tokens read from the [slots, Hkv, D] pool directly."""
    D, slots, dtype = 64, 400, torch.float32
    gen = torch.Generator().manual_seed(hkv * 10 + g)
    kbuf = torch.randn(slots, hkv, D, generator=gen)
    vbuf = torch.randn(slots, hkv, D, generator=gen)
    perm = torch.randperm(slots - 1, generator=gen) + 1  # slot 0 is padding
    req_to_token = torch.zeros(4, 64, dtype=torch.int32)
    # (row, P, L, S, compressed)
    reqs = [(2, 6, 30, 33, True), (0, 0, 25, 26, True), (3, 0, 20, 24, False)]
    used = 0
    for row, P, L, S, _ in reqs:
        req_to_token[row, :S] = perm[used: used + S].int()
        used += S
    # compressed cells of each (request, head): a random subset of its private positions,
    # read from their original slots (the test does not move data; any cell ids work)
    mids, keep_pos = [], []
    for row, P, L, S, comp in reqs:
        if not comp:
            mids.append(None)
            keep_pos.append(None)
            continue
        per_head, pos_head = [], []
        for h in range(hkv):
            k = int(torch.randint(1, L - P, (1,), generator=gen))
            pos = torch.sort(torch.randperm(L - P, generator=gen)[:k]).values + P
            per_head.append(req_to_token[row, pos].long() * hkv + h)
            pos_head.append(pos)
        mids.append(per_head)
        keep_pos.append(pos_head)
    rows = torch.tensor([r[0] for r in reqs])
    P_ = torch.tensor([r[1] if r[4] else r[3] for r in reqs])  # uncompressed: everything is "prefix"
    L_ = torch.tensor([r[2] if r[4] else r[3] for r in reqs])
    S_ = torch.tensor([r[3] for r in reqs])
    pre, pre_lens = gather_row_ranges(req_to_token, rows, torch.zeros_like(P_), P_)
    suf, suf_lens = gather_row_ranges(req_to_token, rows, L_, S_)
    mid_lens = torch.tensor([[0] * hkv if m is None else [int(x.numel()) for x in m] for m in mids])
    mid_cells = torch.cat([x for m in mids if m is not None for x in m])
    pairs = build_pair_indices(hkv, pre, pre_lens, suf, suf_lens, mid_cells, mid_lens)

    qfull = torch.randn(len(reqs), hkv * g, D, generator=gen, dtype=dtype)
    q = qfull.view(len(reqs), hkv, g, D).reshape(-1, g, D)
    out = paged_decode_attention(q, kbuf.view(-1, D), vbuf.view(-1, D), *pairs, 1 / math.sqrt(D), impl=impl)
    out = out.view(len(reqs), hkv * g, D)
    for r, (row, P, L, S, comp) in enumerate(reqs):
        for qh in range(hkv * g):
            h = qh // g
            pos = torch.arange(S)
            if comp:
                pos = torch.cat([torch.arange(P), keep_pos[r][h], torch.arange(L, S)])
            sl = req_to_token[row, pos].long()
            K, V = kbuf[sl, h], vbuf[sl, h]
            ref = torch.softmax(qfull[r, qh] @ K.T / math.sqrt(D), -1) @ V
            torch.testing.assert_close(out[r, qh], ref, **TOL[dtype])


# ---------------------------------------------------------------------------- dispatch
def test_dispatch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    assert dispatch.resolve_impl("decode", cpu) == "torch"
    assert dispatch.resolve_impl("repack", cpu, "triton") == "triton"
    with pytest.raises(ValueError):
        dispatch.resolve_impl("decode", cpu, "flashinfer")
    with pytest.raises(ValueError):
        dispatch.resolve_impl("decode", cpu, "cuda")
    with pytest.raises(ValueError):
        dispatch.resolve_impl("nope", cpu)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.resolve_impl("decode", cpu) == "triton"
    assert dispatch.resolve_impl("decode", cpu, "torch") == "torch"  # explicit argument wins
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        dispatch.resolve_impl("decode", cpu)
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.resolve_impl("repack", cpu) == "torch"
    if not torch.cuda.is_available():
        assert not dispatch.flashinfer_available()
    else:
        cuda = torch.device("cuda")
        assert dispatch.resolve_impl("repack", cuda, "flashinfer") == "triton"
        assert dispatch.resolve_impl("decode", cuda, dtype=torch.float32) == "triton"


def test_env_forces_triton_on_cpu(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    q, k, v, indptr, indices = make_case([3, 20], 2, 64, torch.float32)
    out = paged_decode_attention(q, k, v, indptr, indices, 0.125)
    torch.testing.assert_close(out, naive_decode(q, k, v, indptr, indices, 0.125), **TOL[torch.float32])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only import behaviour")
def test_no_flashinfer_or_sglang_import_on_cpu():
    import subprocess
    import sys

    code = ("import sys, torch; import lava_sglang.kernels as K; from lava_sglang.kernels import flashinfer_decode;"
            "q=torch.randn(2,2,64); k=torch.randn(9,64); ip=torch.tensor([0,2,3]); ix=torch.tensor([1,2,3]);"
            "ref=K.paged_decode_attention(q,k,k,ip,ix,0.1);"
            "print('flashinfer' in sys.modules, 'sglang' in sys.modules, 'triton.language' in sys.modules);"
            # the Triton path on CPU tensors works without TRITON_INTERPRET in the environment
            "out=K.paged_decode_attention(q,k,k,ip,ix,0.1,impl='triton');"
            "print(torch.allclose(out, ref, atol=1e-5))")
    env = {k: v for k, v in os.environ.items() if k not in (dispatch.ENV_VAR, "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False", "False", "True"]


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "flashinfer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_decode_matches_torch(impl, dtype, g, D):
    if impl == "flashinfer" and not dispatch.flashinfer_available():
        pytest.skip("flashinfer not importable")
    lens = [0, 1, 37, 200, 3, 2000, 513]
    q, k, v, indptr, indices = make_case(lens, g, D, dtype, device="cuda")
    scale = 1 / math.sqrt(D)
    ref = naive_decode(q, k, v, indptr, indices, scale)
    out = paged_decode_attention(q, k, v, indptr, indices, scale, impl=impl)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float().cpu(), ref, **TOL[dtype])
    assert (out[0] == 0).all()


@pytest.mark.gpu
@needs_cuda
def test_gpu_flashinfer_decoder_plan_per_layer():
    if not dispatch.flashinfer_available():
        pytest.skip("flashinfer not importable")
    from lava_sglang.kernels.flashinfer_decode import FlashInferPairDecoder

    g, D = 3, 64
    dec = FlashInferPairDecoder(torch.device("cuda"), g, D, torch.float16)
    for layer, lens in enumerate([[5, 0, 80], [1, 300, 2]]):
        q, k, v, indptr, indices = make_case(lens, g, D, torch.float16, seed=layer, device="cuda")
        dec.plan(PairIndices(indptr, indices), 0.125)
        out = dec.run(q, k, v)
        torch.testing.assert_close(out.float().cpu(), naive_decode(q, k, v, indptr, indices, 0.125), **TOL[torch.float16])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check of the interpreter modes")
def test_interpreter_env_mode():
    """The kernels under Triton's standard interpreter mode (TRITON_INTERPRET=1 set before
    Triton is imported), in a fresh process, against their torch twins."""
    import subprocess
    import sys

    code = """
import torch
import lava_sglang.kernels as K
g = torch.Generator().manual_seed(0)
q = torch.randn(3, 4, 64, generator=g, dtype=torch.float16); k = torch.randn(40, 64, generator=g, dtype=torch.float16)
ip = torch.tensor([0, 5, 5, 30]); ix = torch.randint(0, 40, (30,), generator=g)
a = K.paged_decode_attention(q, k, k, ip, ix, 0.125, impl="torch")
b = K.paged_decode_attention(q, k, k, ip, ix, 0.125, impl="triton")
ok1 = torch.allclose(a.float(), b.float(), atol=4e-3, rtol=4e-3)
k1, k2 = k.clone(), k.clone(); src = torch.tensor([5, 6, 30]); dst = torch.tensor([6, 30, 2])
K.repack_cells(k1, k1, src, dst, impl="torch"); K.repack_cells(k2, k2, src, dst, impl="triton")
ok2 = torch.equal(k1, k2)
print(ok1, ok2)
"""
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_VAR}
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["True", "True"], res.stdout
