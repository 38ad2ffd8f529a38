"""Triton repack (see :mod:`.repack`): gather kernel into a temporary, then scatter kernel.

Both kernels move K and V together; grid ``(cdiv(n, BLOCK_R),)``; one program moves
``BLOCK_R`` cells of ``D`` elements (``D`` padded to a power of two and masked).
Torch twin: :func:`lava_sglang.kernels.repack.repack_cells_torch`.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ._triton_utils import cdiv, kernel, next_pow2


def _move_cells(
    SrcK, SrcV, DstK, DstV, SrcIdx, DstIdx,
    n, D,
    stride_sk, stride_sv, stride_dk, stride_dv,
    SRC_INDEXED: tl.constexpr, DST_INDEXED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row ``i`` of the destination gets row ``i`` of the source, where a side marked
    ``*_INDEXED`` is addressed through its index array (cell ids) and the other side is the
    dense temporary."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (offs_d < D)[None, :]
    if SRC_INDEXED:
        src = tl.load(SrcIdx + rows, mask=mask_r, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    if DST_INDEXED:
        dst = tl.load(DstIdx + rows, mask=mask_r, other=0).to(tl.int64)
    else:
        dst = rows.to(tl.int64)
    k = tl.load(SrcK + src[:, None] * stride_sk + offs_d[None, :], mask=mask)
    v = tl.load(SrcV + src[:, None] * stride_sv + offs_d[None, :], mask=mask)
    tl.store(DstK + dst[:, None] * stride_dk + offs_d[None, :], k, mask=mask)
    tl.store(DstV + dst[:, None] * stride_dv + offs_d[None, :], v, mask=mask)


def repack_cells_triton(k_flat, v_flat, src_cells, dst_cells, *, block_r: int = 16) -> None:
    n = src_cells.numel()
    if n == 0:
        return
    C, D = k_flat.shape
    if k_flat.stride(1) != 1 or v_flat.stride(1) != 1:
        raise ValueError("k_flat / v_flat must have a contiguous last dimension")
    src = src_cells.to(device=k_flat.device).contiguous()
    dst = dst_cells.to(device=k_flat.device).contiguous()
    tmp = torch.empty((2, n, D), dtype=k_flat.dtype, device=k_flat.device)
    BLOCK_D = max(16, next_pow2(D))
    grid = (cdiv(n, block_r),)
    move = kernel(_move_cells, k_flat.device)
    # gather: tmp[i] = buf[src[i]]
    move[grid](k_flat, v_flat, tmp[0], tmp[1], src, src, n, D,
               k_flat.stride(0), v_flat.stride(0), D, D,
               SRC_INDEXED=True, DST_INDEXED=False, BLOCK_R=block_r, BLOCK_D=BLOCK_D)
    # scatter: buf[dst[i]] = tmp[i]
    move[grid](tmp[0], tmp[1], k_flat, v_flat, dst, dst, n, D,
               D, D, k_flat.stride(0), v_flat.stride(0),
               SRC_INDEXED=False, DST_INDEXED=True, BLOCK_R=block_r, BLOCK_D=BLOCK_D)
