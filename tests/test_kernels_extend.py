"""Extend (prefill) attention over per-(request, KV head) cell lists, causal aligned to the
end of each list (lava_sglang/kernels/extend_attention.py).

* torch path vs a naive per-pair, per-query loop (fp32), on the one-shot and the chunked
  online-softmax paths, with key chunks smaller than the lists (8, 16) and list lengths
  around the chunk boundaries;
* with one query per pair it equals the decode attention torch path;
* end to end on a fake SGLang pool: an extend chunk over a compressed layout (shared prefix,
  compressed cells, earlier and new tokens) built with ``build_pair_indices``;
* the Triton kernel vs the torch twin in the Triton interpreter on CPU tensors;
* the FlashInfer host-side plan arguments (CPU), and ``gpu``-marked tests of the compiled
  Triton kernel and the FlashInfer path (skipped without CUDA).

Tolerances as in tests/test_kernels_decode.py.
"""

import math
import os

import pytest
import torch

from lava_sglang.kernels import dispatch
from lava_sglang.kernels._triton_utils import triton_available
from lava_sglang.kernels.decode_attention import paged_decode_attention_torch
from lava_sglang.kernels.extend_attention import paged_extend_attention, paged_extend_attention_torch
from lava_sglang.kernels.pair_indices import build_pair_indices, extend_lengths, gather_row_ranges
from lava_sglang.kernels.flashinfer_extend import flashinfer_extend_plan_args

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not importable")


def naive_extend(q, k_flat, v_flat, qo_indptr, kv_indptr, indices, scale):
    """Explicit loops over pairs and queries, fp32 softmax over the visible prefix of the list."""
    nq, g, D = q.shape
    out = torch.zeros((nq, g, v_flat.shape[-1]), dtype=torch.float32)
    qo, kv = qo_indptr.cpu().long().tolist(), kv_indptr.cpu().long().tolist()
    for p in range(len(qo) - 1):
        n_q, n_kv = qo[p + 1] - qo[p], kv[p + 1] - kv[p]
        idx = indices[kv[p]: kv[p + 1]].cpu().long()
        K, V = k_flat.cpu()[idx].float(), v_flat.cpu()[idx].float()
        for i in range(n_q):
            vis = n_kv - n_q + i + 1
            s = q[qo[p] + i].cpu().float() @ K[:vis].T * scale  # [g, vis]
            out[qo[p] + i] = torch.softmax(s, dim=-1) @ V[:vis]
    return out


def make_case(qo_lens, kv_lens, g, D, dtype, Dv=None, C=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    C = C or max(8, 2 * sum(kv_lens))
    Dv = Dv or D
    q = torch.randn(sum(qo_lens), g, D, generator=gen).to(dtype)
    k = torch.randn(C, D, generator=gen).to(dtype)
    v = torch.randn(C, Dv, generator=gen).to(dtype)
    qo = torch.zeros(len(qo_lens) + 1, dtype=torch.int32)
    qo[1:] = torch.tensor(qo_lens, dtype=torch.long).cumsum(0)
    kv = torch.zeros(len(kv_lens) + 1, dtype=torch.int32)
    kv[1:] = torch.tensor(kv_lens, dtype=torch.long).cumsum(0)
    indices = torch.randint(0, C, (sum(kv_lens),), generator=gen)  # repeats allowed
    return [t.to(device) for t in (q, k, v, qo, kv, indices)]


# (qo_lens, kv_lens): uneven lists, qo_len 1 and > 1, qo_len == kv_len (no prefix), a pair
# with 0 queries (with and without cells), lists longer than the small key chunks
LAYOUTS = [
    ([1], [1]),
    ([0], [0]),
    ([3, 0, 5], [3, 7, 40]),
    ([7, 7, 1, 0], [200, 31, 64, 0]),
    ([40, 2, 1], [40, 130, 17]),
    ([16, 16, 9], [16, 33, 9]),
]


# ---------------------------------------------------------------------------- torch path
@pytest.mark.parametrize("single_shot", [True, False], ids=["one-shot", "key-chunks"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [1, 3])
def test_torch_matches_naive(dtype, g, single_shot, monkeypatch):
    import lava_sglang.kernels.extend_attention as ext

    if not single_shot:
        monkeypatch.setattr(ext, "_SINGLE_SHOT_ELEMS", 0)
        monkeypatch.setattr(ext, "_TILE_ELEMS", 300)  # several query-row tiles per key chunk
    D = 32
    for i, (qo_lens, kv_lens) in enumerate(LAYOUTS):
        q, k, v, qo, kv, idx = make_case(qo_lens, kv_lens, g, D, dtype, seed=i)
        scale = 1 / math.sqrt(D)
        ref = naive_extend(q, k, v, qo, kv, idx, scale)
        for chunk in (8, 16, 1024):
            out = paged_extend_attention_torch(q, k, v, qo, kv, idx, scale, key_chunk=chunk)
            assert out.dtype == dtype and out.shape == q.shape
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("tile", [1, 1 << 19], ids=["one-query-tiles", "default-tiles"])
@pytest.mark.parametrize("chunk", [8, 16, 1024])
def test_torch_key_chunk_boundaries(chunk, tile, monkeypatch):
    """Lists of lengths around multiples of the key chunk (and of the 64-key first chunk and
    the 256-key cap), new tokens straddling a chunk boundary; query-row tiles of one query."""
    import lava_sglang.kernels.extend_attention as ext

    monkeypatch.setattr(ext, "_SINGLE_SHOT_ELEMS", 0)
    monkeypatch.setattr(ext, "_TILE_ELEMS", tile)
    c = min(chunk, 64)
    kv_lens = [c - 1, c, c + 1, 2 * c, 64, 65, 129, 3 * c + 5, 256 + 64 + 1, 700]
    qo_lens = [min(n, q) for n, q in zip(kv_lens, [c - 1, 3, c + 1, c + 3, 1, 64, 20, 2 * c, 70, 300])]
    q, k, v, qo, kv, idx = make_case(qo_lens, kv_lens, 3, 16, torch.float32, seed=chunk)
    ref = naive_extend(q, k, v, qo, kv, idx, 0.25)
    out = paged_extend_attention_torch(q, k, v, qo, kv, idx, 0.25, key_chunk=chunk)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("single_shot", [True, False], ids=["one-shot", "key-chunks"])
def test_one_query_per_pair_is_decode(single_shot, monkeypatch):
    import lava_sglang.kernels.extend_attention as ext

    if not single_shot:
        monkeypatch.setattr(ext, "_SINGLE_SHOT_ELEMS", 0)
    kv_lens = [1, 37, 300, 5, 64, 129]
    q, k, v, qo, kv, idx = make_case([1] * len(kv_lens), kv_lens, 4, 64, torch.float32, seed=5)
    dec = paged_decode_attention_torch(q, k, v, kv, idx, 0.125)
    for chunk in (16, 1024):
        out = paged_extend_attention_torch(q, k, v, qo, kv, idx, 0.125, key_chunk=chunk)
        torch.testing.assert_close(out, dec, atol=1e-5, rtol=0)
    out = paged_extend_attention(q, k, v, qo.long(), kv.long(), idx.int(), 0.125)
    torch.testing.assert_close(out, dec, atol=1e-5, rtol=0)


def test_value_dim_differs_and_index_dtypes():
    q, k, v, qo, kv, idx = make_case([4, 0, 9], [10, 3, 9], 2, 32, torch.float32, Dv=48, seed=1)
    ref = naive_extend(q, k, v, qo, kv, idx, 0.2)
    for qo_t, kv_t, idx_t in ((qo, kv, idx), (qo.long(), kv.long(), idx.int()), (qo.int(), kv.long(), idx.long())):
        out = paged_extend_attention(q, k, v, qo_t, kv_t, idx_t, 0.2, impl="torch")
        assert out.shape == (13, 2, 48)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_no_queries_and_auto_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q, k, v, qo, kv, idx = make_case([0, 0], [0, 5], 3, 32, torch.float16)
    out = paged_extend_attention(q, k, v, qo, kv, idx, 0.1)
    assert out.shape == (0, 3, 32) and out.dtype == torch.float16
    q, k, v, qo, kv, idx = make_case([2, 3], [4, 9], 3, 32, torch.float32)
    assert torch.equal(paged_extend_attention(q, k, v, qo, kv, idx, 0.1),
                       paged_extend_attention_torch(q, k, v, qo, kv, idx, 0.1))
    assert dispatch.resolve_impl("extend", torch.device("cpu")) == "torch"
    assert dispatch.OPS["extend"] == ("torch", "triton", "flashinfer")
    with pytest.raises(ValueError):
        dispatch.resolve_impl("extend", torch.device("cpu"), "flashinfer")


def test_errors():
    q, k, v, qo, kv, idx = make_case([2, 5], [4, 9], 3, 32, torch.float32)
    f = paged_extend_attention
    bad_kv = torch.tensor([0, 4, 8], dtype=torch.int32)  # pair 1: 5 queries, 4 cells
    for impl in ("torch", "triton"):
        with pytest.raises(ValueError, match="pair 1: 5 queries but only 4 cells"):
            f(q, k, v, qo, bad_kv, idx[:8], 0.1, impl=impl)
    with pytest.raises(ValueError, match="pair 1"):
        flashinfer_extend_plan_args(qo, bad_kv, idx[:8])
    with pytest.raises(ValueError, match="n_pairs \\+ 1"):
        f(q, k, v, qo, kv[:2], idx, 0.1)
    with pytest.raises(ValueError, match="q has 6 rows"):
        f(q[:6], k, v, qo, kv, idx, 0.1)
    with pytest.raises(ValueError, match="nq_total, g, D"):
        f(q[0], k, v, qo, kv, idx, 0.1)
    with pytest.raises(ValueError, match="head dim"):
        f(q, k[:, :16], v, qo, kv, idx, 0.1)
    with pytest.raises(ValueError, match="cells"):
        f(q, k, v[:-1], qo, kv, idx, 0.1)
    with pytest.raises(ValueError, match="int32 or int64"):
        f(q, k, v, qo.float(), kv, idx, 0.1)
    with pytest.raises(ValueError, match="decreases at pair 1"):
        f(q, k, v, torch.tensor([0, 7, 2]), torch.tensor([0, 9, 9]), idx, 0.1)
    with pytest.raises(ValueError, match="start at 0"):
        extend_lengths(torch.tensor([1, 7]), torch.tensor([0, 9]))
    lens = extend_lengths(qo, kv.long(), 7)
    assert lens.qo_lens == [2, 5] and lens.kv_lens == [4, 9] and lens.qo_starts == [0, 2] and lens.max_qo == 5


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("hkv,g", [(3, 3), (2, 1)])
def test_end_to_end_extend_over_compressed_layout(impl, hkv, g):
    """Two requests in a fake [slots, Hkv, D] pool. Request 0 is compressed (shared prefix
    P, kept cells of its private range [P, L) per head, earlier tokens [L, S0)) and extends by
    n0 new tokens [S0, S0 + n0); request 1 is uncompressed and prefills n1 tokens after a
    cached prefix. q comes in SGLang's extend layout [T, Hq, D]; each new token must attend
    to the visible cells of its head plus the new tokens up to itself."""
    D, slots = 32, 300
    gen = torch.Generator().manual_seed(hkv * 7 + g)
    kbuf = torch.randn(slots, hkv, D, generator=gen)
    vbuf = torch.randn(slots, hkv, D, generator=gen)
    perm = torch.randperm(slots - 1, generator=gen) + 1
    req_to_token = torch.zeros(3, 80, dtype=torch.int32)
    # (row, P, L, S (before this chunk), n_new, compressed)
    reqs = [(1, 5, 30, 34, 6, True), (2, 0, 12, 12, 9, False)]
    used = 0
    for row, P, L, S, n, _ in reqs:
        req_to_token[row, : S + n] = perm[used: used + S + n].int()
        used += S + n
    mids, keep = [], []
    for row, P, L, S, n, comp in reqs:
        if not comp:
            mids.append(None)
            keep.append(None)
            continue
        pos_h = [torch.sort(torch.randperm(L - P, generator=gen)[: int(torch.randint(1, L - P, (1,), generator=gen))]).values + P
                 for _ in range(hkv)]
        keep.append(pos_h)
        mids.append([req_to_token[row, p].long() * hkv + h for h, p in enumerate(pos_h)])
    rows = torch.tensor([r[0] for r in reqs])
    P_ = torch.tensor([r[1] if r[5] else r[3] + r[4] for r in reqs])
    L_ = torch.tensor([r[2] if r[5] else r[3] + r[4] for r in reqs])
    E_ = torch.tensor([r[3] + r[4] for r in reqs])
    pre, pre_lens = gather_row_ranges(req_to_token, rows, torch.zeros_like(P_), P_)
    suf, suf_lens = gather_row_ranges(req_to_token, rows, L_, E_)
    mid_lens = torch.tensor([[0] * hkv if m is None else [int(x.numel()) for x in m] for m in mids])
    mid_cells = torch.cat([x for m in mids if m is not None for x in m])
    pairs = build_pair_indices(hkv, pre, pre_lens, suf, suf_lens, mid_cells, mid_lens)

    ns = [r[4] for r in reqs]
    qfull = torch.randn(sum(ns), hkv * g, D, generator=gen)  # SGLang's extend q [T, Hq, D]
    # pair-major query rows: request r, head h -> q_r.view(n, Hkv, g, D).transpose(0, 1)
    q_pairs = torch.cat([x.view(x.shape[0], hkv, g, D).transpose(0, 1).reshape(-1, g, D) for x in qfull.split(ns)])
    qo = torch.zeros(len(reqs) * hkv + 1, dtype=torch.int32)
    qo[1:] = torch.tensor([n for n in ns for _ in range(hkv)]).cumsum(0)
    out = paged_extend_attention(q_pairs, kbuf.view(-1, D), vbuf.view(-1, D), qo, *pairs, 1 / math.sqrt(D), impl=impl)
    t0 = 0
    for r, (row, P, L, S, n, comp) in enumerate(reqs):
        for h in range(hkv):
            base = int(qo[r * hkv + h])
            for i in range(n):
                end = S + i + 1
                pos = torch.cat([torch.arange(P), keep[r][h], torch.arange(L, end)]) if comp else torch.arange(end)
                sl = req_to_token[row, pos].long()
                for j in range(g):
                    qv = qfull[t0 + i, h * g + j]
                    ref = torch.softmax(qv @ kbuf[sl, h].T / math.sqrt(D), -1) @ vbuf[sl, h]
                    torch.testing.assert_close(out[base + i, j], ref, **TOL[torch.float32])
        t0 += n


# ---------------------------------------------------------------------------- Triton (interpreter)
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [1, 3])
def test_triton_matches_torch(dtype, g):
    D = 32
    for i, (qo_lens, kv_lens) in enumerate([([3, 0, 5], [3, 7, 40]), ([7, 7, 1, 0], [90, 31, 64, 0]), ([20, 1], [20, 50])]):
        q, k, v, qo, kv, idx = make_case(qo_lens, kv_lens, g, D, dtype, seed=10 * i + g)
        scale = 1 / math.sqrt(D)
        ref = paged_extend_attention_torch(q, k, v, qo, kv, idx, scale)
        out = paged_extend_attention(q, k, v, qo, kv, idx, scale, impl="triton")
        assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@needs_triton
def test_triton_index_dtypes_blocks_and_value_dim():
    from lava_sglang.kernels._triton_extend import paged_extend_attention_triton

    q, k, v, qo, kv, idx = make_case([5, 0, 12, 1], [9, 4, 12, 33], 3, 16, torch.float32, Dv=24, seed=3)
    ref = naive_extend(q, k, v, qo, kv, idx, 0.3)
    for qo_t, kv_t, idx_t in ((qo, kv, idx.int()), (qo.long(), kv.long(), idx.long())):
        out = paged_extend_attention(q, k, v, qo_t, kv_t, idx_t, 0.3, impl="triton")
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
    # row blocks splitting a query's heads, key tiles shorter than the lists; trusted lengths
    out = paged_extend_attention_triton(q, k, v, qo, kv, idx, 0.3, block_r=16, block_n=16, max_qo_len=12, check=False)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@needs_triton
def test_triton_one_query_per_pair_and_no_queries():
    q, k, v, qo, kv, idx = make_case([1, 1, 1], [1, 40, 7], 3, 32, torch.float16, seed=4)
    dec = paged_decode_attention_torch(q, k, v, kv, idx, 0.2)
    out = paged_extend_attention(q, k, v, qo, kv, idx, 0.2, impl="triton")
    torch.testing.assert_close(out.float(), dec.float(), **TOL[torch.float16])
    q, k, v, qo, kv, idx = make_case([0, 0], [0, 5], 3, 32, torch.float16)
    assert paged_extend_attention(q, k, v, qo, kv, idx, 0.1, impl="triton").shape == (0, 3, 32)


# Compiles the kernel for real NVIDIA targets to a cubin without a GPU (as
# tests/test_kernels_compile.py does for the other kernels), in a subprocess without
# TRITON_INTERPRET: catches what the interpreter does not (tl.dot shapes/dtypes, typing).
_COMPILE_CODE = """
import inspect, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from lava_sglang.kernels._triton_extend import _extend_kernel
for arch, dt, D, idx in ((80, "fp16", 64, "*i32"), (80, "bf16", 128, "*i64"), (80, "fp32", 64, "*i64"), (90, "bf16", 128, "*i32")):
    t = "*" + dt
    sig = dict(Q=t, K=t, V=t, Out=t, QoIndptr="*i32", KvIndptr="*i32", Indices=idx, sm_scale="fp32", G="i32", D="i32",
               DV="i32", stride_qt="i32", stride_qg="i32", stride_k="i32", stride_v="i32", stride_ot="i32", stride_og="i32")
    ce = dict(BLOCK_R=64, BLOCK_N=32, BLOCK_D=D, BLOCK_DV=D, FP32_DOT=dt == "fp32")
    full = {n: ("constexpr" if n in ce else sig[n]) for n in inspect.signature(_extend_kernel).parameters}
    name = f"{dt}-D{D}-sm{arch}"
    try:
        k = triton.compile(ASTSource(fn=JITFunction(_extend_kernel), signature=full, constexprs=ce),
                           target=GPUTarget("cuda", arch, 32))
        print(json.dumps({"name": name, "ok": len(k.asm.get("cubin", b"")) > 0, "error": ""}))
    except Exception as e:
        print(json.dumps({"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[-1500:]}))
"""


@needs_triton
def test_triton_kernel_compiles_for_sm80_and_sm90():
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_CODE], capture_output=True, text=True, env=env, timeout=600)
    results = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(results) == 4, res.stderr[-3000:]
    failed = {r["name"]: r["error"] for r in results if not r["ok"]}
    assert not failed, failed


# ---------------------------------------------------------------------------- FlashInfer host side
def test_flashinfer_plan_args():
    q, k, v, qo, kv, idx = make_case([3, 0, 1, 0], [3, 5, 9, 0], 3, 32, torch.float32)
    args = flashinfer_extend_plan_args(qo.long(), kv.long(), idx.long())
    for t in args:
        assert t.dtype == torch.int32 and t.device.type == "cpu"
    assert args.qo_indptr.tolist() == [0, 3, 3, 4, 4]
    assert args.paged_kv_indptr.tolist() == [0, 3, 8, 17, 17]
    assert torch.equal(args.paged_kv_indices, idx.int())
    # page_size 1: one page per cell; last page holds 1 entry (0 for an empty list)
    assert args.paged_kv_last_page_len.tolist() == [1, 1, 1, 0]
    # FlashInfer's kv length formula gives back the list lengths
    lens = (args.paged_kv_indptr[1:] - args.paged_kv_indptr[:-1] - 1).clamp_min(0) + args.paged_kv_last_page_len
    assert lens.tolist() == [3, 5, 9, 0]
    empty = flashinfer_extend_plan_args(torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), idx[:0])
    assert empty.paged_kv_last_page_len.numel() == 0 and empty.qo_indptr.tolist() == [0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only import behaviour")
def test_no_flashinfer_import_on_cpu():
    import subprocess
    import sys

    code = ("import sys, torch; import lava_sglang.kernels as K; from lava_sglang.kernels import flashinfer_extend;"
            "q=torch.randn(3,2,16); k=torch.randn(9,16); qo=torch.tensor([0,1,3]); kv=torch.tensor([0,2,5]); ix=torch.arange(5);"
            "K.paged_extend_attention(q,k,k,qo,kv,ix,0.1);"
            "print('flashinfer' in sys.modules, 'sglang' in sys.modules, 'triton.language' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in (dispatch.ENV_VAR, "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False", "False"]


# ---------------------------------------------------------------------------- GPU
GPU_LAYOUT = ([0, 1, 37, 200, 3, 513, 64], [0, 1, 37, 700, 40, 2000, 64])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "flashinfer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_extend_matches_torch(impl, dtype, g, D):
    if impl == "flashinfer" and not dispatch.flashinfer_available():
        pytest.skip("flashinfer not importable")
    q, k, v, qo, kv, idx = make_case(*GPU_LAYOUT, g, D, dtype, device="cuda")
    scale = 1 / math.sqrt(D)
    ref = paged_extend_attention_torch(q.cpu(), k.cpu(), v.cpu(), qo.cpu(), kv.cpu(), idx.cpu(), scale)
    out = paged_extend_attention(q, k, v, qo, kv, idx, scale, impl=impl)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float().cpu(), ref.float(), **TOL[dtype])


@pytest.mark.gpu
@needs_cuda
def test_gpu_flashinfer_extender_plan_per_layer():
    if not dispatch.flashinfer_available():
        pytest.skip("flashinfer not importable")
    from lava_sglang.kernels.flashinfer_extend import FlashInferPairExtender

    g, D = 3, 64
    ext = FlashInferPairExtender(torch.device("cuda"), g, D, torch.float16)
    for layer, (qo_lens, kv_lens) in enumerate([([5, 0, 80], [5, 9, 300]), ([1, 30, 2], [40, 30, 2])]):
        q, k, v, qo, kv, idx = make_case(qo_lens, kv_lens, g, D, torch.float16, seed=layer, device="cuda")
        ext.plan(qo, kv, idx, 0.125)
        out = ext.run(q, k, v)
        ref = naive_extend(q, k, v, qo, kv, idx, 0.125)
        torch.testing.assert_close(out.float().cpu(), ref, **TOL[torch.float16])
