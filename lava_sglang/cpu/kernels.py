"""Pure-torch implementations of the ``sgl_kernel`` CPU entry points SGLang's CPU engine calls.

Semantics follow the Triton kernels they stand in for on GPU (same file in SGLang):
``assign_req_to_token_pool`` (``srt/mem_cache/allocation.py``) and
``copy_all_layer_kv_cache_tiled`` (``kernels/ops/kvcache/cache_move.py``).
"""

from __future__ import annotations

import ctypes

import torch


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """For each request i: ``req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[o_i : o_i + n_i]``.

    ``n_i = end[i] - start[i]`` and ``o_i`` is the sum of the previous requests' ``n``:
    ``out_cache_loc`` holds the new slots of all requests back to back. In place.
    """
    if req_pool_indices.numel() == 0:
        return
    if req_to_token.shape[1] != pool_len:
        raise ValueError(f"pool_len {pool_len} does not match req_to_token width {req_to_token.shape[1]}")
    start = start_offset.to(torch.int64)
    lengths = end_offset.to(torch.int64) - start
    if bool((lengths < 0).any()):
        raise ValueError("end_offset must not be smaller than start_offset")
    total = int(lengths.sum())
    if total == 0:
        return
    rows = torch.repeat_interleave(req_pool_indices.to(torch.int64), lengths)
    # Position inside each request's run: global arange minus the run's first output index.
    run_first = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(run_first, lengths)
    cols += torch.repeat_interleave(start, lengths)
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


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

    ``data_ptrs[b]`` is the address of buffer b (uint64) and ``strides[b]`` its row size in
    bytes; row ``r`` of buffer b is the bytes ``[r*stride, (r+1)*stride)``. All source rows are
    read before any target row is written, so overlapping source and target sets are safe (as
    in the tiled Triton kernel, which loads all rows of a tile before storing).
    """
    if src_loc.numel() != tgt_loc.numel():
        raise ValueError(f"src_loc has {src_loc.numel()} entries but tgt_loc has {tgt_loc.numel()}")
    if src_loc.numel() == 0:
        return
    src = src_loc.to(torch.int64).cpu()
    tgt = tgt_loc.to(torch.int64).cpu()
    if bool((src < 0).any()) or bool((tgt < 0).any()):
        raise ValueError("locations must not be negative")
    rows_needed = int(torch.maximum(src.max(), tgt.max())) + 1
    for address, stride in zip(data_ptrs.tolist(), strides.tolist()):
        stride = int(stride)
        if address == 0 or stride <= 0:
            raise ValueError(f"invalid buffer (address {address:#x}, row stride {stride})")
        rows = _byte_view(int(address), rows_needed * stride).view(rows_needed, stride)
        rows[tgt] = rows[src].clone()


def _not_yet(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} (CPU stand-in) is not implemented yet")

    fn.__name__ = name
    return fn


# Speculative-decoding entry points (imported at module import time by SGLang's CPU engine).
build_tree_kernel_efficient_cpu = _not_yet("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _not_yet("verify_tree_greedy_cpu")
fill_accept_out_cache_loc_cpu = _not_yet("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _not_yet("fill_bonus_tokens_cpu")
assign_draft_cache_locs_contiguous_cpu = _not_yet("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _not_yet("assign_extend_cache_locs_cpu")
rotate_input_ids_cpu = _not_yet("rotate_input_ids_cpu")
