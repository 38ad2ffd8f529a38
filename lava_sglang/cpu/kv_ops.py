"""Pure-torch stand-ins for the KV-cache bookkeeping entry points of ``sgl_kernel`` (CPU).

Every CPU server calls these: SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports them
from ``sgl_kernel`` and uses them on every prefill and on KV moves (see :mod:`lava_sglang.cpu`
and :mod:`lava_sglang.cpu.sgl_kernel_ops`). Semantics follow the GPU twin named in each docstring
(paths relative to the ``sglang`` package):

* ``assign_req_to_token_pool_cpu``: ``assign_req_to_token_pool`` (``srt/mem_cache/allocation.py``);
* ``copy_all_layer_kv_cache_cpu``: ``copy_all_layer_kv_cache_tiled`` (``kernels/ops/kvcache/cache_move.py``).

Out-of-bounds ranges or indices raise ``ValueError`` instead of touching other rows.
"""

from __future__ import annotations

import ctypes

import torch

from lava_sglang.cpu.tensor_utils import I64, row_cells


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Scatter new slots into ``req_to_token``; mirrors the Triton ``assign_req_to_token_pool``.

    For each request i (``i < len(req_pool_indices)``), with ``n_i = end[i] - start[i]`` and
    ``o_i = n_0 + ... + n_{i-1}`` (``out_cache_loc`` holds the new slots of all requests
    back to back)::

        req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[o_i : o_i + n_i]

    In place. Zero-length requests write nothing.
    """
    cells = row_cells(req_to_token, pool_len, req_pool_indices, start_offset, end_offset)
    if cells is None:
        return
    rows, cols = cells
    if cols.numel() > out_cache_loc.numel():
        raise ValueError(f"out_cache_loc has {out_cache_loc.numel()} entries, {cols.numel()} needed")
    req_to_token[rows, cols] = out_cache_loc.reshape(-1)[: cols.numel()].to(req_to_token.dtype)


def _byte_view(address: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor sharing the memory at ``address`` (no copy)."""
    array = (ctypes.c_uint8 * nbytes).from_address(address)
    return torch.frombuffer(array, dtype=torch.uint8)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Copy rows ``src_loc`` to rows ``tgt_loc`` in every buffer, in place.

    Mirrors the Triton ``copy_all_layer_kv_cache_tiled``. ``data_ptrs[b]`` is the address
    of buffer b (uint64) and ``strides[b]`` its row size in bytes; row ``r`` of buffer b is
    the bytes ``[r*stride, (r+1)*stride)``. All source rows are read before any target row
    is written, so overlapping source and target sets are safe (as in the tiled Triton
    kernel, which loads all rows of a tile before storing). Zero locations: nothing.
    """
    if src_loc.numel() != tgt_loc.numel():
        raise ValueError(f"src_loc has {src_loc.numel()} entries but tgt_loc has {tgt_loc.numel()}")
    if src_loc.numel() == 0:
        return
    src = src_loc.reshape(-1).to(I64).cpu()
    tgt = tgt_loc.reshape(-1).to(I64).cpu()
    if bool((src < 0).any()) or bool((tgt < 0).any()):
        raise ValueError("locations must not be negative")
    rows_needed = int(torch.maximum(src.max(), tgt.max())) + 1
    for address, stride in zip(data_ptrs.tolist(), strides.tolist()):
        stride = int(stride)
        if address == 0 or stride <= 0:
            raise ValueError(f"invalid buffer (address {address:#x}, row stride {stride})")
        rows = _byte_view(int(address), rows_needed * stride).view(rows_needed, stride)
        rows[tgt] = rows[src]  # advanced indexing gathers a copy first
