"""Pure-torch stand-ins for the accepted-token and cache-location entry points of ``sgl_kernel``
(speculative decoding).

Why speculative stand-ins exist at all: see :mod:`lava_sglang.cpu`. Semantics follow the GPU twin
named in each docstring (paths relative to ``sglang``):

* ``fill_accept_out_cache_loc_cpu``, ``fill_bonus_tokens_cpu``: ``fill_accept_out_cache_loc``,
  ``fill_bonus_tokens`` (``kernels/ops/speculative/eagle.py``);
* ``assign_draft_cache_locs_contiguous_cpu``, ``assign_extend_cache_locs_cpu``:
  ``assign_draft_cache_locs_contiguous``, ``assign_extend_cache_locs``
  (``kernels/ops/speculative/cache_locs.py``);
* ``rotate_input_ids_cpu``: ``rotate_input_ids_kernel`` (``kernels/ops/speculative/multi_layer_eagle.py``).

Out-of-bounds ranges or indices raise ``ValueError`` instead of touching other rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from lava_sglang.cpu.tensor_utils import I64, check_in, check_pool_len, concat_ranges, flat_view, row_cells


# --------------------------------------------------------------------------------------
# speculative decoding: accepted tokens and cache locations


def fill_accept_out_cache_loc_cpu(
    accept_index: torch.Tensor,
    out_cache_loc: torch.Tensor,
    accept_out_cache_loc: torch.Tensor,
    size: Optional[int] = None,
) -> None:
    """Compact the cache slots of accepted tokens; mirrors the Triton ``fill_accept_out_cache_loc``.

    ``fill_accept_out_cache_loc_func`` (``eagle.py``) calls it with three arguments; the
    Triton grid there is ``size = accept_index.numel()``, the default here (the optional
    ``size`` also accepts the four-argument form of newer sgl-kernel builds). Over the flat
    ``a = accept_index.flatten()[:size]``: for every j with ``a[j] > -1``::

        accept_out_cache_loc[#{j' < j : a[j'] != -1}] = out_cache_loc[a[j]]

    i.e. the valid entries are packed to the front in order (the -1 padding is skipped).
    In place; the rest of ``accept_out_cache_loc`` is left untouched. (Like the Triton
    kernel, an entry below -1 is not copied but still takes an output position; SGLang only
    pads with -1.)
    """
    flat = accept_index.reshape(-1).to(I64)
    if size is not None:
        flat = flat[: int(size)]
    if flat.numel() == 0:
        return
    counted = (flat != -1).to(I64)
    dst = torch.cumsum(counted, 0) - counted
    keep = flat > -1
    src = flat[keep]
    dst = dst[keep]
    if src.numel() == 0:
        return
    source = out_cache_loc.reshape(-1)
    out = flat_view(accept_out_cache_loc, "accept_out_cache_loc")
    check_in(src, 0, source.numel(), "accept_index")
    check_in(dst, 0, out.numel(), "accept_out_cache_loc position")
    out[dst] = source[src].to(out.dtype)


def fill_bonus_tokens_cpu(
    accept_tokens: torch.Tensor,
    accept_lens: torch.Tensor,
    bonus_tokens: torch.Tensor,
    accept_stride: int,
) -> None:
    """Last accepted token of each request; mirrors the Triton ``fill_bonus_tokens`` (``eagle.py``).

    ``accept_tokens`` holds ``accept_stride`` tokens per request (row-major flat; it is
    ``predict[accept_index]``), ``accept_lens[i]`` counts request i's accepted tokens
    including the bonus token, so for ``i < len(accept_lens)``::

        bonus_tokens[i] = accept_tokens.flatten()[accept_stride * i + accept_lens[i] - 1]

    In place.
    """
    bs = accept_lens.numel()
    if bs == 0:
        return
    tokens = accept_tokens.reshape(-1)
    out = flat_view(bonus_tokens, "bonus_tokens")
    if out.numel() < bs:
        raise ValueError(f"bonus_tokens has {out.numel()} entries for {bs} requests")
    idx = int(accept_stride) * torch.arange(bs, dtype=I64) + accept_lens.reshape(-1).to(I64) - 1
    check_in(idx, 0, tokens.numel(), "accept_tokens index")
    out[:bs] = tokens[idx].to(out.dtype)


def assign_draft_cache_locs_contiguous_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
    topk: int,
    num_steps: int,
) -> None:
    """Gather each request's draft slots; mirrors ``assign_draft_cache_locs_contiguous`` (``cache_locs.py``).

    With ``m = topk * num_steps``, for each request i (``i < len(seq_lens)``; the Triton
    path's ``positions``/``mrope`` outputs are not part of the CPU call)::

        out_cache_loc[i*m : (i+1)*m] = req_to_token[req_pool_indices[i], seq_lens[i] : seq_lens[i] + m]

    In place.
    """
    bs = seq_lens.numel()
    m = int(topk) * int(num_steps)
    if bs == 0 or m == 0:
        return
    check_pool_len(req_to_token, pool_len)
    out = flat_view(out_cache_loc, "out_cache_loc")
    if out.numel() < bs * m:
        raise ValueError(f"out_cache_loc has {out.numel()} entries, {bs * m} needed")
    cols = seq_lens.reshape(-1).to(I64)[:, None] + torch.arange(m, dtype=I64)
    check_in(cols, 0, int(pool_len), "req_to_token column")
    rows = req_pool_indices.reshape(-1)[:bs].to(I64)
    out[: bs * m] = req_to_token[rows[:, None], cols].reshape(-1).to(out.dtype)


def assign_extend_cache_locs_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Gather ranges of ``req_to_token`` back to back; mirrors ``assign_extend_cache_locs`` (``cache_locs.py``).

    The inverse of :func:`assign_req_to_token_pool_cpu`: for each request i
    (``i < len(req_pool_indices)``), with ``o_i`` the sum of the previous requests'
    ``end - start``::

        out_cache_loc[o_i : o_i + end[i] - start[i]] = req_to_token[req_pool_indices[i], start[i]:end[i]]

    In place; entries past the total are left untouched. Also used by
    ``fill_front_out_cache_loc_func`` with an int32 ``[bs, window]`` table.
    """
    cells = row_cells(req_to_token, pool_len, req_pool_indices, start_offset, end_offset)
    if cells is None:
        return
    rows, cols = cells
    out = flat_view(out_cache_loc, "out_cache_loc")
    if out.numel() < cols.numel():
        raise ValueError(f"out_cache_loc has {out.numel()} entries, {cols.numel()} needed")
    out[: cols.numel()] = req_to_token[rows, cols].to(out.dtype)


def rotate_input_ids_cpu(
    input_ids: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    topk_index: torch.Tensor,
    select_index: Optional[torch.Tensor] = None,
) -> None:
    """Advance each request's draft window by one token; mirrors ``rotate_input_ids_kernel``.

    (``multi_layer_eagle.py``.) For each request i (``i < len(extend_seq_lens)``) with
    ``s = extend_start_loc[i]``, ``L = extend_seq_lens[i]``: shift the segment left by one,
    ``input_ids[s : s+L-1] = input_ids[s+1 : s+L]`` (old values), then, when ``L > 0``,
    write the new token ``topk_index.flatten()[i]`` at ``select_index[i]`` (an absolute
    index into ``input_ids``) if ``select_index`` is given, else at ``s + L - 1``. All
    shifts read the values from before the call; segments are assumed not to overlap
    (as on GPU, where overlapping segments would race). In place.
    """
    bs = extend_seq_lens.numel()
    if bs == 0:
        return
    ids = flat_view(input_ids, "input_ids")
    start = extend_start_loc.reshape(-1)[:bs].to(I64)
    lengths = extend_seq_lens.reshape(-1).to(I64)
    if bool((lengths < 0).any()):
        raise ValueError("extend_seq_lens must not be negative")
    _, dst, _ = concat_ranges(start, (lengths - 1).clamp(min=0))
    if dst.numel():
        check_in(dst + 1, 0, ids.numel(), "input_ids index")
        ids[dst] = ids[dst + 1]  # the right-hand side is gathered (copied) before the write
    has = lengths > 0
    if not bool(has.any()):
        return
    if select_index is not None:
        where = select_index.reshape(-1)[:bs].to(I64)[has]
    else:
        where = (start + lengths - 1)[has]
    check_in(where, 0, ids.numel(), "input_ids index")
    new = topk_index.reshape(-1)[:bs][has]
    ids[where] = new.to(ids.dtype)
