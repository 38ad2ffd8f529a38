"""Triton split-K decode attention over CSR lists of cells (flash-decoding style).

Stage 1, grid ``(n_pairs, num_splits)``: program ``(p, s)`` takes the ``s``-th of
``num_splits`` equal pieces of pair ``p``'s list (pieces rounded up to ``BLOCK_N`` keys;
trailing pieces of short lists are empty), walks it in tiles of ``BLOCK_N`` cells
(gathered through ``kv_indices``) with an online softmax for the ``g`` query heads
(``BLOCK_G >= 16`` rows so ``tl.dot`` maps to tensor cores), and writes the unnormalized
partial output, running max and sum (fp32).
Stage 2, grid ``(n_pairs,)``: merges the pieces; empty lists give zeros.

``tl.dot`` runs on the 16-bit inputs (fp32 accumulation) for fp16/bf16 and in exact fp32
(``input_precision="ieee"``) for fp32 inputs. The Triton interpreter's ``tl.dot`` is wrong
for bf16 operands (numpy has no bf16), so in the interpreter bf16 inputs take the fp32 dot
(see :func:`._triton_utils.dot_in_fp32`); compiled kernels use the bf16 dot.

The number of splits is chosen on the host from ``n_pairs`` and ``nnz`` (no device sync).
Torch twin: :func:`lava_sglang.kernels.decode_attention.paged_decode_attention_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import cdiv, dot_in_fp32, kernel, next_pow2

NEG_BIG = tl.constexpr(-1.0e30)


def _decode_stage1(
    Q, K, V, Indptr, Indices, MidO, MidM, MidL,
    sm_scale,
    G, D,
    stride_qp, stride_qg, stride_k, stride_v,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    start = tl.load(Indptr + pid_p).to(tl.int64)
    end = tl.load(Indptr + pid_p + 1).to(tl.int64)
    length = end - start
    split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + pid_s * split
    hi = tl.minimum(lo + split, end)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    mask_d = offs_d < D
    q = tl.load(
        Q + pid_p.to(tl.int64) * stride_qp + offs_g[:, None] * stride_qg + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :], other=0.0,
    )
    if FP32_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + offs_n
        mask_n = offs < hi
        cells = tl.load(Indices + offs, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + cells[:, None] * stride_k + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * sm_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cells[:, None] * stride_v + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    mid = (pid_p.to(tl.int64) * NUM_SPLITS + pid_s) * BLOCK_G
    tl.store(MidM + mid + offs_g, m_i)
    tl.store(MidL + mid + offs_g, l_i)
    tl.store(MidO + (mid + offs_g[:, None]) * BLOCK_D + offs_d[None, :], acc)


def _decode_stage2(
    MidO, MidM, MidL, Out,
    G, D, stride_op, stride_og,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_p = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    base = pid_p.to(tl.int64) * NUM_SPLITS * BLOCK_G
    m_tot = tl.full([BLOCK_G], NEG_BIG, dtype=tl.float32)
    for s in range(NUM_SPLITS):
        m_tot = tl.maximum(m_tot, tl.load(MidM + base + s * BLOCK_G + offs_g))
    l_tot = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        row = base + s * BLOCK_G + offs_g
        w = tl.exp(tl.load(MidM + row) - m_tot)
        l_tot += tl.load(MidL + row) * w
        acc += tl.load(MidO + row[:, None] * BLOCK_D + offs_d[None, :]) * w[:, None]
    nonempty = l_tot > 0.0
    out = acc / tl.where(nonempty, l_tot, 1.0)[:, None]
    mask = (offs_g < G)[:, None] & (offs_d < D)[None, :]
    tl.store(
        Out + pid_p.to(tl.int64) * stride_op + offs_g[:, None] * stride_og + offs_d[None, :],
        out.to(Out.dtype.element_ty), mask=mask,
    )


def default_num_splits(n_pairs: int, nnz: int, block_n: int) -> int:
    """Enough programs to fill a GPU (~256) without splitting below one tile per piece."""
    if n_pairs == 0:
        return 1
    want = cdiv(256, n_pairs)
    avg_tiles = cdiv(max(nnz, 1), n_pairs * block_n)
    return int(max(1, min(16, want, next_pow2(avg_tiles) * 2)))


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    *,
    num_splits: int | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    n_pairs, g, D = q.shape
    out = torch.empty_like(q)
    if n_pairs == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    if k_flat.stride(1) != 1 or v_flat.stride(1) != 1:
        raise ValueError("k_flat / v_flat must have a contiguous last dimension")
    kv_indptr = kv_indptr.contiguous()
    kv_indices = kv_indices.contiguous()
    if kv_indices.numel() == 0:  # Triton cannot take an empty pointer on every backend
        kv_indices = torch.zeros(1, dtype=kv_indices.dtype, device=kv_indices.device)
    BLOCK_G = max(16, next_pow2(g))
    BLOCK_D = max(16, next_pow2(D))
    if num_splits is None:
        num_splits = default_num_splits(n_pairs, kv_indices.numel(), block_n)
    f32 = dict(dtype=torch.float32, device=q.device)
    mid_o = torch.empty((n_pairs, num_splits, BLOCK_G, BLOCK_D), **f32)
    mid_m = torch.empty((n_pairs, num_splits, BLOCK_G), **f32)
    mid_l = torch.empty((n_pairs, num_splits, BLOCK_G), **f32)
    fp32 = dot_in_fp32(q.dtype, k_flat.dtype, device=q.device)
    kernel(_decode_stage1, q.device)[(n_pairs, num_splits)](
        q, k_flat, v_flat, kv_indptr, kv_indices, mid_o, mid_m, mid_l,
        float(sm_scale), g, D,
        q.stride(0), q.stride(1), k_flat.stride(0), v_flat.stride(0),
        NUM_SPLITS=num_splits, BLOCK_G=BLOCK_G, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
        FP32_DOT=fp32,
    )
    kernel(_decode_stage2, q.device)[(n_pairs,)](
        mid_o, mid_m, mid_l, out, g, D, out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D,
    )
    return out


__all__ = ["paged_decode_attention_triton", "default_num_splits"]
_ = triton  # imported for its side effects on tl
