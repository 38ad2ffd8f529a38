"""Triton extend (prefill) attention over CSR lists of cells, causal aligned to the end.

NEVER RUN ON A GPU: written and tested only in the Triton interpreter on CPU tensors
(against the torch twin); compiling it to a cubin for sm_80 / sm_90 without a GPU is
tested too (``test_triton_kernel_compiles_for_sm80_and_sm90``). Check the numbers with
``pytest -m gpu tests/test_kernels_extend.py`` on a CUDA machine.

Grid ``(n_pairs, cdiv(max_qo * g, BLOCK_R))``. The ``n_q`` query rows of a pair times its
``g`` query heads are packed into ``n_q * g`` rows (row ``r`` = query ``r // g``, head
``r % g``; FlashInfer's packed GQA layout), so a program holds ``BLOCK_R`` (query, head) rows
that share the pair's keys, and ``g = 3`` wastes no lanes. Program ``(p, b)`` loads rows
``[b * BLOCK_R, (b + 1) * BLOCK_R)`` of pair ``p`` (none when past ``n_q * g``), walks the
pair's list in tiles of ``BLOCK_N`` cells (gathered through ``kv_indices``) up to the last
key its last query sees, with an online softmax, and writes the normalized output. Query
``i`` sees keys ``0 .. n_kv - n_q + i`` of the list.

``tl.dot`` runs on the 16-bit inputs (fp32 accumulation) for fp16/bf16 and in exact fp32
(``input_precision="ieee"``) for fp32 inputs, and in fp32 for bf16 in the interpreter (see
:func:`._triton_utils.dot_in_fp32`), as in :mod:`._triton_decode`.

The grid needs ``max(qo_len)``: the host reads both indptrs once (which also checks
``kv_len >= qo_len``), unless the caller passes ``max_qo_len`` with ``check=False``.
Torch twin: :func:`lava_sglang.kernels.extend_attention.paged_extend_attention_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import cdiv, dot_in_fp32, kernel, next_pow2
from .pair_indices import extend_lengths

NEG_BIG = tl.constexpr(-1.0e30)


def _extend_kernel(
    Q, K, V, Out, QoIndptr, KvIndptr, Indices,
    sm_scale,
    G, D, DV,
    stride_qt, stride_qg, stride_k, stride_v, stride_ot, stride_og,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    q_start = tl.load(QoIndptr + pid_p).to(tl.int64)
    q_end = tl.load(QoIndptr + pid_p + 1).to(tl.int64)
    kv_start = tl.load(KvIndptr + pid_p).to(tl.int64)
    kv_end = tl.load(KvIndptr + pid_p + 1).to(tl.int64)
    n_q = q_end - q_start
    n_kv = kv_end - kv_start
    offset = n_kv - n_q  # keys every query of the pair sees
    n_rows = n_q * G

    row0 = pid_b * BLOCK_R
    rows = row0 + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    tok = rows // G
    head = rows % G
    lim = tl.where(mask_r, offset + tok, -1)  # last visible key of each row
    # keys needed by this block: up to the one its last row sees (none when it has no row)
    last_row = tl.minimum(row0 + BLOCK_R, n_rows) - 1
    hi = tl.where(row0 < n_rows, tl.minimum(n_kv, offset + tl.maximum(last_row, 0) // G + 1), 0)

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    q = tl.load(
        Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qg + offs_d[None, :],
        mask=mask_r[:, None] & mask_d[None, :], other=0.0,
    )
    if FP32_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_R], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs = n0 + offs_n
        mask_n = offs < hi
        cells = tl.load(Indices + kv_start + offs, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K + cells[:, None] * stride_k + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * sm_scale
        visible = (offs[None, :] <= lim[:, None]) & mask_n[None, :]
        s = tl.where(visible, s, float("-inf"))
        # m_i starts at -1e30, not -inf: rows with no visible key so far get p = 0, alpha = 1
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cells[:, None] * stride_v + offs_dv[None, :], mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_og + offs_dv[None, :],
        out.to(Out.dtype.element_ty), mask=mask_r[:, None] & mask_dv[None, :],
    )


def paged_extend_attention_triton(
    q: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    *,
    max_qo_len: int | None = None,
    check: bool = True,
    block_r: int = 64,
    block_n: int = 32,
) -> torch.Tensor:
    """``q [nq_total, g, D]`` -> ``[nq_total, g, Dv]`` (see the module docstring).

    ``check=False`` with ``max_qo_len`` given skips the host read of the indptrs (no sync;
    the lengths are then trusted)."""
    nq_total, g, D = q.shape
    Dv = v_flat.shape[-1]
    n_pairs = qo_indptr.numel() - 1
    if check or max_qo_len is None:
        lens = extend_lengths(qo_indptr, kv_indptr, nq_total)
        if max_qo_len is None:
            max_qo_len = lens.max_qo
    out = torch.empty((nq_total, g, Dv), dtype=q.dtype, device=q.device)
    if nq_total == 0 or n_pairs == 0 or max_qo_len == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    if k_flat.stride(1) != 1 or v_flat.stride(1) != 1:
        raise ValueError("k_flat / v_flat must have a contiguous last dimension")
    qo_indptr = qo_indptr.contiguous()
    kv_indptr = kv_indptr.contiguous()
    kv_indices = kv_indices.contiguous()
    if kv_indices.numel() == 0:  # Triton cannot take an empty pointer on every backend
        kv_indices = torch.zeros(1, dtype=kv_indices.dtype, device=kv_indices.device)
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_DV = max(16, next_pow2(Dv))
    block_r = max(16, next_pow2(block_r))
    block_n = max(16, next_pow2(block_n))
    fp32 = dot_in_fp32(q.dtype, k_flat.dtype, device=q.device)
    grid = (n_pairs, cdiv(int(max_qo_len) * g, block_r))
    kernel(_extend_kernel, q.device)[grid](
        q, k_flat, v_flat, out, qo_indptr, kv_indptr, kv_indices,
        float(sm_scale), g, D, Dv,
        q.stride(0), q.stride(1), k_flat.stride(0), v_flat.stride(0), out.stride(0), out.stride(1),
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        FP32_DOT=fp32,
    )
    return out


__all__ = ["paged_extend_attention_triton"]
_ = triton  # imported for its side effects on tl
