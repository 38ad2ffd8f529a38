"""Triton window scoring (see :mod:`.window_scores` for the algorithm and the layout).

Rows of a program: the ``g`` query heads x ``w`` window queries of one KV group, row
``m = gi * BLOCK_W + wi`` (query head ``kvh * g + gi``, window query ``wi``), padded to
``BLOCK_G x BLOCK_W`` (powers of two, at least 16 rows for ``tl.dot``).

Torch twin: :func:`lava_sglang.kernels.window_scores.window_scores_torch` (the policies'
``attention_scores``).
"""

from __future__ import annotations

import math

import torch
import triton.language as tl

from ._triton_utils import cdiv, dot_in_fp32, kernel, next_pow2

NEG_BIG = tl.constexpr(-1.0e30)


def _ws_stats(
    Q, QIndptr, K, V, KSlots, KIndptr, Prefix, StatM, StatL, VMax,
    sm_scale, G, D,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    VALUE_NORM: tl.constexpr, FP32_DOT: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    n_kvh = tl.num_programs(1)
    BLOCK_M: tl.constexpr = BLOCK_G * BLOCK_W
    q0 = tl.load(QIndptr + r).to(tl.int64)
    w = (tl.load(QIndptr + r + 1) - q0).to(tl.int32)
    k0 = tl.load(KIndptr + r).to(tl.int64)
    n = (tl.load(KIndptr + r + 1) - k0).to(tl.int32)
    p_len = tl.load(Prefix + r).to(tl.int32)

    offs_m = tl.arange(0, BLOCK_M)
    gi = offs_m // BLOCK_W
    wi = offs_m % BLOCK_W
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row_ok = (gi < G) & (wi < w)
    q = tl.load(
        Q + (q0 + wi.to(tl.int64))[:, None] * stride_qt + (kvh * G + gi)[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & mask_d[None, :], other=0.0,
    )
    if FP32_DOT:
        q = q.to(tl.float32)
    last = n - w + wi  # position of window query wi: it sees keys j <= last

    split = ((n + SPLITS - 1) // SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = sp * split
    hi = tl.minimum(lo + split, n)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    vmax = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        mask_j = j < hi
        slots = tl.load(KSlots + k0 + j, mask=mask_j, other=0).to(tl.int64)
        kv_mask = mask_j[:, None] & mask_d[None, :]
        k = tl.load(K + slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * sm_scale
        ok = mask_j[None, :] & (j[None, :] <= last[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
        if VALUE_NORM:
            v_ok = mask_j & (j >= p_len) & (j < n - w)
            v = tl.load(V + slots[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                        mask=v_ok[:, None] & mask_d[None, :], other=0.0)
            vmax = tl.maximum(vmax, tl.sum(tl.abs(v.to(tl.float32)), 1))
    base = ((r * n_kvh + kvh) * SPLITS + sp).to(tl.int64)
    tl.store(StatM + base * BLOCK_M + offs_m, m_i)
    tl.store(StatL + base * BLOCK_M + offs_m, l_i)
    if VALUE_NORM:
        tl.store(VMax + base, tl.max(vmax, 0))


def _ws_mean(
    Q, QIndptr, K, KSlots, KIndptr, Prefix, ExtIndptr, StatM, StatL, A,
    sm_scale, G, D,
    stride_qt, stride_qh, stride_ks, stride_kh,
    HALF: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    t = tl.program_id(2)
    n_kvh = tl.num_programs(1)
    BLOCK_M: tl.constexpr = BLOCK_G * BLOCK_W
    q0 = tl.load(QIndptr + r).to(tl.int64)
    w = (tl.load(QIndptr + r + 1) - q0).to(tl.int32)
    k0 = tl.load(KIndptr + r).to(tl.int64)
    n = (tl.load(KIndptr + r + 1) - k0).to(tl.int32)
    p_len = tl.load(Prefix + r).to(tl.int32)
    start = tl.maximum(p_len - HALF, 0)
    ext_len = n - w - start
    a0 = tl.load(ExtIndptr + r).to(tl.int64)
    j = start + t * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_j = j < n - w
    if t * BLOCK_N < ext_len:
        offs_m = tl.arange(0, BLOCK_M)
        gi = offs_m // BLOCK_W
        wi = offs_m % BLOCK_W
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        row_ok = (gi < G) & (wi < w)
        # merge the row statistics of the splits
        base = ((r * n_kvh + kvh) * SPLITS).to(tl.int64) * BLOCK_M
        m_row = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
        for sp in range(SPLITS):
            m_row = tl.maximum(m_row, tl.load(StatM + base + sp * BLOCK_M + offs_m))
        l_row = tl.zeros([BLOCK_M], dtype=tl.float32)
        for sp in range(SPLITS):
            l_row += tl.load(StatL + base + sp * BLOCK_M + offs_m) * tl.exp(tl.load(StatM + base + sp * BLOCK_M + offs_m) - m_row)
        inv_l = tl.where(row_ok, 1.0 / tl.where(row_ok, l_row, 1.0), 0.0)

        q = tl.load(
            Q + (q0 + wi.to(tl.int64))[:, None] * stride_qt + (kvh * G + gi)[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None] & mask_d[None, :], other=0.0,
        )
        slots = tl.load(KSlots + k0 + j, mask=mask_j, other=0).to(tl.int64)
        k = tl.load(K + slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                    mask=mask_j[:, None] & mask_d[None, :], other=0.0)
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        # scored and halo keys j < n - w are seen by every window query: no causal mask
        p = tl.exp(s * sm_scale - m_row[:, None]) * inv_l[:, None]
        p = tl.where(mask_j[None, :], p, 0.0)
        a = tl.sum(tl.reshape(p, [BLOCK_G, BLOCK_W, BLOCK_N]), 1) / w.to(tl.float32)  # [BLOCK_G, BLOCK_N]
        offs_g = tl.arange(0, BLOCK_G)
        rows = (kvh * G + offs_g).to(tl.int64)
        tl.store(A + a0 + rows[:, None] * ext_len + (j - start)[None, :], a,
                 mask=(offs_g < G)[:, None] & mask_j[None, :])


def _ws_pool(
    A, QIndptr, KIndptr, Prefix, ExtIndptr, OutIndptr, VMax, Out,
    G,
    KSIZE: tl.constexpr, POOL_MAX: tl.constexpr, GQA_MAX: tl.constexpr, VALUE_NORM: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    t = tl.program_id(2)
    n_kvh = tl.num_programs(1)
    HALF: tl.constexpr = KSIZE // 2
    w = (tl.load(QIndptr + r + 1) - tl.load(QIndptr + r)).to(tl.int32)
    n = (tl.load(KIndptr + r + 1) - tl.load(KIndptr + r)).to(tl.int32)
    p_len = tl.load(Prefix + r).to(tl.int32)
    start = tl.maximum(p_len - HALF, 0)
    ext_len = n - w - start
    n_out = n - w - p_len
    if t * BLOCK_N < n_out:
        a0 = tl.load(ExtIndptr + r).to(tl.int64)
        o0 = tl.load(OutIndptr + r).to(tl.int64)
        i = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_i = i < n_out
        offs_g = tl.arange(0, BLOCK_G)
        mask_g = offs_g < G
        rows = (kvh * G + offs_g).to(tl.int64)
        e = p_len - start + i  # index of key p_len + i in the scratch row
        if POOL_MAX:
            pooled = tl.full([BLOCK_G, BLOCK_N], float("-inf"), dtype=tl.float32)
        else:
            pooled = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        for o in tl.static_range(KSIZE):
            ee = e + (o - HALF)
            ok = mask_g[:, None] & (mask_i & (ee >= 0) & (ee < ext_len))[None, :]
            if POOL_MAX:
                x = tl.load(A + a0 + rows[:, None] * ext_len + ee[None, :], mask=ok, other=float("-inf"))
                pooled = tl.maximum(pooled, x)
            else:
                x = tl.load(A + a0 + rows[:, None] * ext_len + ee[None, :], mask=ok, other=0.0)
                pooled += x
        if not POOL_MAX:
            pooled = pooled / KSIZE
        if VALUE_NORM:
            vb = ((r * n_kvh + kvh) * SPLITS).to(tl.int64)
            factor = tl.load(VMax + vb)
            for sp in range(1, SPLITS):
                factor = tl.maximum(factor, tl.load(VMax + vb + sp))
            pooled = pooled * factor
        if GQA_MAX:
            s = tl.max(tl.where(mask_g[:, None], pooled, float("-inf")), 0)
        else:
            s = tl.sum(tl.where(mask_g[:, None], pooled, 0.0), 0) / G
        tl.store(Out + o0 * n_kvh + kvh * n_out + i, s, mask=mask_i)


def default_splits(R: int, hkv: int, max_n: int, block_n: int) -> int:
    """Key splits of the statistics pass: ~256 programs, at least one tile per piece."""
    want = cdiv(256, max(1, R * hkv))
    return int(max(1, min(32, want, cdiv(max(max_n, 1), block_n))))


def window_scores_triton(q_win, q_indptr, k_buffer, v_buffer, key_slots, key_indptr, lists, *,
                         kernel_size: int, pooling: str, gqa: str, value_norm: bool,
                         splits: int | None = None, block_n: int = 32) -> list[torch.Tensor]:
    qi, ki, P, w, N = lists
    R = len(P)
    hq, D = q_win.shape[1], q_win.shape[2]
    hkv = k_buffer.shape[1]
    g = hq // hkv
    device = k_buffer.device
    half = kernel_size // 2
    starts = [max(0, P[r] - half) for r in range(R)]
    ext = [max(0, N[r] - w[r] - starts[r]) for r in range(R)]
    n_out = [max(0, N[r] - w[r] - P[r]) for r in range(R)]
    out_off = [0]
    for x in n_out:
        out_off.append(out_off[-1] + x)
    out = torch.zeros(hkv * out_off[-1], dtype=torch.float32, device=device)
    results = [out[hkv * out_off[r]: hkv * out_off[r + 1]].view(hkv, n_out[r]) for r in range(R)]
    if R == 0 or out_off[-1] == 0:
        return results
    ext_off = [0]
    for x in ext:
        ext_off.append(ext_off[-1] + hq * x)

    if q_win.stride(2) != 1:
        q_win = q_win.contiguous()
    if k_buffer.stride(2) != 1 or (v_buffer is not None and v_buffer.stride(2) != 1):
        raise ValueError("k_buffer / v_buffer must have a contiguous last dimension")
    i32 = dict(dtype=torch.int32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    q_indptr_t = torch.tensor(qi, **i64)
    k_indptr_t = torch.tensor(ki, **i64)
    prefix_t = torch.tensor(P, **i32)
    ext_indptr_t = torch.tensor(ext_off, **i64)
    out_indptr_t = torch.tensor(out_off, **i64)
    key_slots = key_slots.to(device).contiguous()
    if v_buffer is None:
        v_buffer = k_buffer  # never read

    BLOCK_G = next_pow2(g)
    BLOCK_W = max(next_pow2(max(w)), cdiv(16, BLOCK_G))
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_M = BLOCK_G * BLOCK_W
    if splits is None:
        splits = default_splits(R, hkv, max(N), block_n)
    f32 = dict(dtype=torch.float32, device=device)
    stat_m = torch.empty((R, hkv, splits, BLOCK_M), **f32)
    stat_l = torch.empty((R, hkv, splits, BLOCK_M), **f32)
    vmax = torch.zeros((R, hkv, splits), **f32)
    scratch = torch.empty(max(1, ext_off[-1]), **f32)
    scale = 1.0 / math.sqrt(D)
    fp32 = dot_in_fp32(q_win.dtype, k_buffer.dtype, device=device)
    common = dict(BLOCK_G=BLOCK_G, BLOCK_W=BLOCK_W, BLOCK_N=block_n, BLOCK_D=BLOCK_D, FP32_DOT=fp32, SPLITS=splits)

    kernel(_ws_stats, device)[(R, hkv, splits)](
        q_win, q_indptr_t, k_buffer, v_buffer, key_slots, k_indptr_t, prefix_t, stat_m, stat_l, vmax,
        scale, g, D,
        q_win.stride(0), q_win.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        VALUE_NORM=value_norm, **common,
    )
    kernel(_ws_mean, device)[(R, hkv, cdiv(max(ext), block_n))](
        q_win, q_indptr_t, k_buffer, key_slots, k_indptr_t, prefix_t, ext_indptr_t, stat_m, stat_l, scratch,
        scale, g, D,
        q_win.stride(0), q_win.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        HALF=half, **common,
    )
    pool_block = 64
    kernel(_ws_pool, device)[(R, hkv, cdiv(max(n_out), pool_block))](
        scratch, q_indptr_t, k_indptr_t, prefix_t, ext_indptr_t, out_indptr_t, vmax, out,
        g,
        KSIZE=kernel_size, POOL_MAX=pooling == "max", GQA_MAX=gqa == "max", VALUE_NORM=value_norm,
        SPLITS=splits, BLOCK_G=BLOCK_G, BLOCK_N=pool_block,
    )
    return results
