"""Pure-torch implementations of the ``sgl_kernel`` CPU entry points SGLang's CPU engine calls.

SGLang 0.5.23 imports these names from ``sgl_kernel`` at import time when its CPU engine is
selected (``SGLANG_USE_CPU_ENGINE=1``); see :mod:`lava_sglang.cpu`. Each function takes
exactly the arguments SGLang passes at its CPU call site (the same ones the GPU path gives
its Triton kernel or CUDA op) and writes its outputs in place. Semantics follow the GPU
twin named in each docstring (paths relative to the ``sglang`` package):

* ``assign_req_to_token_pool_cpu``: ``assign_req_to_token_pool`` (``srt/mem_cache/allocation.py``);
* ``copy_all_layer_kv_cache_cpu``: ``copy_all_layer_kv_cache_tiled`` (``kernels/ops/kvcache/cache_move.py``);
* ``build_tree_kernel_efficient_cpu``: ``sgl_build_tree_kernel_efficient_triton``
  (``kernels/ops/speculative/spec_tree.py``); its bit-packed mask mode, which the Triton
  wrapper refuses, follows the CUDA ``build_tree_efficient_partial_packed``
  (``kernels/jit/include/sgl_kernel/speculative/eagle.cuh``);
* ``verify_tree_greedy_cpu``: ``verify_tree_greedy_kernel_triton`` (``spec_tree.py``);
* ``fill_accept_out_cache_loc_cpu``, ``fill_bonus_tokens_cpu``: ``fill_accept_out_cache_loc``,
  ``fill_bonus_tokens`` (``kernels/ops/speculative/eagle.py``);
* ``assign_draft_cache_locs_contiguous_cpu``, ``assign_extend_cache_locs_cpu``:
  ``assign_draft_cache_locs_contiguous``, ``assign_extend_cache_locs``
  (``kernels/ops/speculative/cache_locs.py``);
* ``rotate_input_ids_cpu``: ``rotate_input_ids_kernel`` (``kernels/ops/speculative/multi_layer_eagle.py``).

Where the GPU kernel would read or write out of bounds (a range running past the end of a
``req_to_token`` row, an index outside a tensor), these functions raise ``ValueError``
instead of touching other rows. Index tensors may have any integer dtype; values written
are cast to the destination's dtype.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

_I64 = torch.int64

# Tree mask layouts of build_tree_kernel_efficient (speculative::TreeMaskMode).
_FULL_MASK, _QLEN_ONLY, _QLEN_ONLY_BITPACKING = 0, 1, 2


# --------------------------------------------------------------------------------------
# helpers


def _flat(t: torch.Tensor, name: str) -> torch.Tensor:
    """A 1-D view of ``t`` sharing its memory (writes through it land in ``t``)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is written in place through a flat view)")
    return t.view(-1)


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated ``arange(starts[i], starts[i] + lengths[i])`` for all i.

    Returns ``(owner, position, rank)``: for every element, the index i of its range, its
    value, and its index inside the concatenation (0..total-1). Lengths must be >= 0.
    """
    total = int(lengths.sum()) if lengths.numel() else 0
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), dtype=_I64), lengths)
    rank = torch.arange(total, dtype=_I64)
    first = torch.cumsum(lengths, 0) - lengths  # exclusive prefix sum: rank of each range's first element
    position = rank - first[owner] + starts[owner]
    return owner, position, rank


def _lengths(start_offset: torch.Tensor, end_offset: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = start_offset.reshape(-1)[:n].to(_I64)
    lengths = end_offset.reshape(-1)[:n].to(_I64) - start
    if bool((lengths < 0).any()):
        raise ValueError("end_offset must not be smaller than start_offset")
    return start, lengths


def _check_pool_len(req_to_token: torch.Tensor, pool_len: int) -> None:
    if req_to_token.dim() != 2 or req_to_token.shape[1] != int(pool_len):
        raise ValueError(
            f"pool_len {pool_len} does not match req_to_token of shape {tuple(req_to_token.shape)}"
        )


def _check_in(values: torch.Tensor, low: int, high: int, what: str) -> None:
    """Raise unless every value lies in ``[low, high)``."""
    if values.numel() and (int(values.min()) < low or int(values.max()) >= high):
        raise ValueError(f"{what} out of range [{low}, {high}): min {int(values.min())}, max {int(values.max())}")


# --------------------------------------------------------------------------------------
# KV cache bookkeeping (used by every CPU server)


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
    n = req_pool_indices.numel()
    if n == 0:
        return
    _check_pool_len(req_to_token, pool_len)
    start, lengths = _lengths(start_offset, end_offset, n)
    owner, cols, rank = _ranges(start, lengths)
    if rank.numel() == 0:
        return
    _check_in(cols, 0, int(pool_len), "req_to_token column")
    if rank.numel() > out_cache_loc.numel():
        raise ValueError(f"out_cache_loc has {out_cache_loc.numel()} entries, {rank.numel()} needed")
    rows = req_pool_indices.reshape(-1).to(_I64)[owner]
    req_to_token[rows, cols] = out_cache_loc.reshape(-1)[: rank.numel()].to(req_to_token.dtype)


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
    src = src_loc.reshape(-1).to(_I64).cpu()
    tgt = tgt_loc.reshape(-1).to(_I64).cpu()
    if bool((src < 0).any()) or bool((tgt < 0).any()):
        raise ValueError("locations must not be negative")
    rows_needed = int(torch.maximum(src.max(), tgt.max())) + 1
    for address, stride in zip(data_ptrs.tolist(), strides.tolist()):
        stride = int(stride)
        if address == 0 or stride <= 0:
            raise ValueError(f"invalid buffer (address {address:#x}, row stride {stride})")
        rows = _byte_view(int(address), rows_needed * stride).view(rows_needed, stride)
        rows[tgt] = rows[src]  # advanced indexing gathers a copy first


# --------------------------------------------------------------------------------------
# speculative decoding: EAGLE tree


def build_tree_kernel_efficient_cpu(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    verified_seq_len: torch.Tensor,
    tree_mask: torch.Tensor,
    positions: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    topk: int,
    depth: int,
    draft_token_num: int,
    tree_mask_mode: int,
) -> None:
    """Build the EAGLE draft tree of each request; mirrors ``sgl_build_tree_kernel_efficient_triton``.

    Called positionally by ``build_tree_kernel_efficient_func`` (``spec_tree.py``). Per request
    b, with ``n = draft_token_num``, ``S = selected_index[b]`` (``n - 1`` ids of the chosen
    draft tokens), ``P = parent_list[b]`` and ``L = verified_seq_len[b]``: draft token 0 is
    the root (the verified last token), draft token ``i >= 1`` is ``S[i-1]``. Its parent is
    the root when ``S[i-1] // topk == 0``, else the draft token ``k + 1`` for the first ``k``
    with ``S[k] == P[S[i-1] // topk]`` (if there is none the token gets no parent link: the
    CUDA kernel prints "invalid eagle tree" and skips it).

    Written, in place:

    * ``retrive_index[b, i] = b * n + i``.
    * Child/sibling lists, built by visiting ``i = n-1 .. 1`` and pushing i onto its parent's
      list: ``retrive_next_token[b, p]`` = first (smallest) child of p;
      ``retrive_next_sibling[b, i]`` = next larger child of the same parent. For the largest
      child, the value ``retrive_next_token[b, p]`` held on entry is pushed down as its
      sibling unless it is -1 (callers pass both buffers filled with -1). Entries of
      tokens without children / later siblings are left as they were.
    * ``positions[b*n + i] = L + depth_of(i)`` (root depth 0; the walk up to the root is
      bounded by ``depth`` steps, as in the Triton kernel).
    * ``tree_mask`` row of draft token i: column 0 (the root) True, column ``j + 1`` True
      when draft token ``j + 1`` is i or an ancestor of i, other tree columns False. Layout:
      ``tree_mask_mode`` 0 (FULL_MASK) flat rows of ``L + n`` per request, requests back to
      back (``sum(L) * n + bs * n * n`` elements), the tree columns are the last n of a row
      and the first L are not touched (callers pre-fill them); mode 1 (QLEN_ONLY) rows of n,
      row ``b * n + i``; mode 2 (QLEN_ONLY_BITPACKING, from the CUDA kernel; the Triton
      wrapper refuses it) one little-endian bit-field per row of ``1``/``2``/``4`` bytes for
      ``n`` up to 8/16/32, bit c = column c: its first byte is overwritten, the other bytes
      are OR-ed into (callers zero the buffer).
    """
    n, topk, depth, mode = int(draft_token_num), int(topk), int(depth), int(tree_mask_mode)
    if topk <= 0 or depth <= 0 or n <= 0:
        raise ValueError(f"need topk > 0, depth > 0, draft_token_num > 0 (got {topk}, {depth}, {n})")
    if mode not in (_FULL_MASK, _QLEN_ONLY, _QLEN_ONLY_BITPACKING):
        raise ValueError(f"unknown tree_mask_mode {tree_mask_mode}")
    bs = verified_seq_len.numel()
    if bs == 0:
        return
    seq_len = verified_seq_len.reshape(bs).to(_I64)
    sel = selected_index.reshape(bs, n - 1).to(_I64)
    parents = (parent_list.reshape(1, -1) if parent_list.dim() == 1 else parent_list).to(_I64)
    if parents.shape[0] != bs:
        raise ValueError(f"parent_list has {parents.shape[0]} rows for {bs} requests")
    for name, t in (("retrive_index", retrive_index), ("retrive_next_token", retrive_next_token),
                    ("retrive_next_sibling", retrive_next_sibling)):
        if tuple(t.shape) != (bs, n):
            raise ValueError(f"{name} must have shape {(bs, n)}, got {tuple(t.shape)}")
    positions_flat = _flat(positions, "positions")
    if positions_flat.numel() < bs * n:
        raise ValueError(f"positions has {positions_flat.numel()} entries, {bs * n} needed")
    batch = torch.arange(bs, dtype=_I64)

    # Parent of selected entry k (draft token k + 1): -1 root, -2 not found, else the k' of S[k'].
    parent_tb = torch.div(sel, topk, rounding_mode="trunc")
    is_root = parent_tb == 0
    par = torch.full((bs, n - 1), -1, dtype=_I64)
    if n > 1 and not bool(is_root.all()):
        _check_in(parent_tb[~is_root], 1, parents.shape[1], "parent_list index selected_index // topk")
        parent_token = parents[batch[:, None], torch.where(is_root, 1, parent_tb)]  # [bs, n-1]
        match = sel[:, None, :] == parent_token[:, :, None]  # [bs, k, k']
        found = match.any(-1)
        first = match.to(torch.int8).argmax(-1)  # first k' (argmax returns the first maximum)
        par = torch.where(is_root, par, torch.where(found, first, torch.full_like(first, -2)))

    # retrive_index
    retrive_index.copy_((batch[:, None] * n + torch.arange(n, dtype=_I64)).to(retrive_index.dtype))

    # Child / sibling lists. Token i = k + 1 hangs under draft position pp[k] when linked[k].
    if n > 1:
        linked = par != -2
        pp = torch.where(is_root, 0, par + 1)  # [bs, n-1]
        tok = torch.arange(1, n, dtype=_I64)  # token id of entry k
        big = n + 1
        # Later siblings: entries k2 > k with the same parent; the next sibling is the smallest.
        same = linked[:, :, None] & linked[:, None, :] & (pp[:, :, None] == pp[:, None, :])
        same &= tok[None, None, :] > tok[None, :, None]
        next_sib = torch.where(same, tok[None, None, :], big).amin(-1)  # [bs, n-1]
        has_sib = next_sib < big
        # First child of each draft position p: the smallest linked token under p.
        child = linked[:, None, :] & (pp[:, None, :] == torch.arange(n, dtype=_I64)[None, :, None])
        first_child = torch.where(child, tok[None, None, :], big).amin(-1)  # [bs, n]
        has_child = first_child < big

        old_next = retrive_next_token.to(_I64)
        old_sib = retrive_next_sibling[:, 1:].to(_I64)
        origin = old_next[batch[:, None], pp.clamp(0, n - 1)]  # list head before this call
        new_sib = torch.where(has_sib, next_sib, torch.where(linked & (origin != -1), origin, old_sib))
        retrive_next_sibling[:, 1:] = new_sib.to(retrive_next_sibling.dtype)
        retrive_next_token.copy_(torch.where(has_child, first_child, old_next).to(retrive_next_token.dtype))

    # Ancestor walk: anc[b, x, c] = column c of draft token x's mask row; depth_of[b, x].
    anc = torch.zeros(bs, n, n, dtype=torch.bool)
    anc[:, :, 0] = True
    depth_of = torch.zeros(bs, n, dtype=_I64)
    if n > 1:
        rows = torch.arange(1, n, dtype=_I64)
        cur = (rows - 1).expand(bs, n - 1).clone()
        active = torch.ones(bs, n - 1, dtype=torch.bool)
        b_idx = batch[:, None].expand(bs, n - 1)
        x_idx = rows[None, :].expand(bs, n - 1)
        for _ in range(depth):
            if not bool(active.any()):
                break
            depth_of[:, 1:] += active
            anc[b_idx[active], x_idx[active], cur[active] + 1] = True
            nxt = par[b_idx, cur]
            active &= nxt >= 0
            cur = torch.where(active, nxt, cur)
    positions_flat[: bs * n] = (seq_len[:, None] + depth_of).reshape(-1).to(positions_flat.dtype)

    if mode == _QLEN_ONLY_BITPACKING:
        if n > 32:
            raise ValueError("QLEN_ONLY_BITPACKING supports at most 32 draft tokens")
        nbytes = 4 if n > 16 else (2 if n > 8 else 1)
        mask_bytes = _flat(tree_mask, "tree_mask").view(torch.uint8)
        if mask_bytes.numel() < bs * n * nbytes:
            raise ValueError(f"tree_mask has {mask_bytes.numel()} bytes, {bs * n * nbytes} needed")
        weights = torch.tensor([1 << c for c in range(n)], dtype=_I64)
        bits = (anc.to(_I64) * weights).sum(-1).reshape(-1)  # [bs*n]
        shifts = torch.arange(nbytes, dtype=_I64) * 8
        new = ((bits[:, None] >> shifts) & 0xFF).to(torch.uint8)  # [bs*n, nbytes]
        cells = mask_bytes[: bs * n * nbytes].view(bs * n, nbytes)
        cells[:, 1:] |= new[:, 1:]
        cells[:, 0] = new[:, 0]
        return

    mask_flat = _flat(tree_mask, "tree_mask")
    if mode == _FULL_MASK:
        prefix = torch.cumsum(seq_len, 0) - seq_len
        row_start = (n * n * batch + n * prefix)[:, None] + (seq_len[:, None] + n) * torch.arange(n, dtype=_I64)
        base = row_start + seq_len[:, None]  # [bs, n]: index of the root column of each row
        needed = int(seq_len.sum()) * n + bs * n * n
    else:
        base = (batch[:, None] * n + torch.arange(n, dtype=_I64)) * n
        needed = bs * n * n
    if mask_flat.numel() < needed:
        raise ValueError(f"tree_mask has {mask_flat.numel()} elements, {needed} needed")
    index = (base[:, :, None] + torch.arange(n, dtype=_I64)).reshape(-1)
    mask_flat[index] = anc.reshape(-1).to(mask_flat.dtype)


def verify_tree_greedy_cpu(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
) -> None:
    """Greedy verification of the draft trees; mirrors ``verify_tree_greedy_kernel_triton``.

    Called with keywords by ``verify_tree_greedy_func`` (``spec_tree.py``; the ``retrive_*``
    spelling is the op schema's). Per request b (``candidates`` is ``[bs, n]``,
    ``accept_index`` is ``[bs, S]``): start at the root, ``last = retrive_index[b, 0]``,
    ``accept_index[b, 0] = last``. Then up to ``S - 1`` times: go to the first child
    (``retrive_next_token``) of the current node and walk its siblings
    (``retrive_next_sibling``, at most n of them) for the first one whose draft token
    ``candidates[b, node]`` equals the target model's greedy token after the last accepted
    one, ``target_predict.flat[last]``. On a match: ``predicts.flat[last] = that token``, the
    accept count grows by one, ``accept_index[b, count] = retrive_index[b, node]``, ``last``
    becomes that index and the walk continues from the node; otherwise stop. Finally
    ``accept_token_num[b] = count`` and ``predicts.flat[last] = target_predict.flat[last]``
    (the bonus token). In place; entries not named here are left untouched.
    """
    if candidates.dim() != 2:
        raise ValueError("candidates must be [batch, num_draft_tokens]")
    bs, n = candidates.shape
    num_spec = accept_index.shape[1]
    if n <= 0 or num_spec <= 0:
        raise ValueError("need num_draft_tokens > 0 and accept_index.shape[1] > 0")
    if bs == 0:
        return
    pred = _flat(predicts, "predicts")
    ri = retrive_index.reshape(bs, n).to(_I64)
    nt = retrive_next_token.reshape(bs, n).to(_I64)
    ns = retrive_next_sibling.reshape(bs, n).to(_I64)
    cand = candidates.to(_I64)
    tp = target_predict.reshape(-1).to(_I64)
    _check_in(ri, 0, min(pred.numel(), tp.numel()), "retrive_index")
    _check_in(nt, -1, n, "retrive_next_token")
    _check_in(ns, -1, n, "retrive_next_sibling")
    batch = torch.arange(bs, dtype=_I64)

    last = ri[:, 0].clone()
    accept_index[:, 0] = last.to(accept_index.dtype)
    count = torch.zeros(bs, dtype=_I64)
    cur = torch.zeros(bs, dtype=_I64)
    alive = torch.ones(bs, dtype=torch.bool)
    for _ in range(1, num_spec):
        if not bool(alive.any()):
            break
        cur = torch.where(alive, nt[batch, cur.clamp(min=0)], cur)
        target = tp[last]
        searching = alive & (cur != -1)
        matched = torch.zeros(bs, dtype=torch.bool)
        for _ in range(n):
            if not bool(searching.any()):
                break
            node = cur.clamp(min=0)
            hit = searching & (cand[batch, node] == target)
            if bool(hit.any()):
                draft_index = ri[batch, node]
                pred[last[hit]] = target[hit].to(pred.dtype)
                count += hit
                accept_index[batch[hit], count[hit]] = draft_index[hit].to(accept_index.dtype)
                last = torch.where(hit, draft_index, last)
                matched |= hit
                searching &= ~hit
            cur = torch.where(searching, ns[batch, node], cur)
            searching &= cur != -1
        alive &= matched
    accept_token_num.reshape(-1)[:bs] = count.to(accept_token_num.dtype)
    pred[last] = tp[last].to(pred.dtype)


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
    flat = accept_index.reshape(-1).to(_I64)
    if size is not None:
        flat = flat[: int(size)]
    if flat.numel() == 0:
        return
    counted = (flat != -1).to(_I64)
    dst = torch.cumsum(counted, 0) - counted
    keep = flat > -1
    src = flat[keep]
    dst = dst[keep]
    if src.numel() == 0:
        return
    source = out_cache_loc.reshape(-1)
    out = _flat(accept_out_cache_loc, "accept_out_cache_loc")
    _check_in(src, 0, source.numel(), "accept_index")
    _check_in(dst, 0, out.numel(), "accept_out_cache_loc position")
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
    out = _flat(bonus_tokens, "bonus_tokens")
    if out.numel() < bs:
        raise ValueError(f"bonus_tokens has {out.numel()} entries for {bs} requests")
    idx = int(accept_stride) * torch.arange(bs, dtype=_I64) + accept_lens.reshape(-1).to(_I64) - 1
    _check_in(idx, 0, tokens.numel(), "accept_tokens index")
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
    _check_pool_len(req_to_token, pool_len)
    out = _flat(out_cache_loc, "out_cache_loc")
    if out.numel() < bs * m:
        raise ValueError(f"out_cache_loc has {out.numel()} entries, {bs * m} needed")
    cols = seq_lens.reshape(-1).to(_I64)[:, None] + torch.arange(m, dtype=_I64)
    _check_in(cols, 0, int(pool_len), "req_to_token column")
    rows = req_pool_indices.reshape(-1)[:bs].to(_I64)
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
    n = req_pool_indices.numel()
    if n == 0:
        return
    _check_pool_len(req_to_token, pool_len)
    start, lengths = _lengths(start_offset, end_offset, n)
    owner, cols, rank = _ranges(start, lengths)
    if rank.numel() == 0:
        return
    _check_in(cols, 0, int(pool_len), "req_to_token column")
    out = _flat(out_cache_loc, "out_cache_loc")
    if out.numel() < rank.numel():
        raise ValueError(f"out_cache_loc has {out.numel()} entries, {rank.numel()} needed")
    rows = req_pool_indices.reshape(-1).to(_I64)[owner]
    out[: rank.numel()] = req_to_token[rows, cols].to(out.dtype)


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
    ids = _flat(input_ids, "input_ids")
    start = extend_start_loc.reshape(-1)[:bs].to(_I64)
    lengths = extend_seq_lens.reshape(-1).to(_I64)
    if bool((lengths < 0).any()):
        raise ValueError("extend_seq_lens must not be negative")
    _, dst, _ = _ranges(start, (lengths - 1).clamp(min=0))
    if dst.numel():
        _check_in(dst + 1, 0, ids.numel(), "input_ids index")
        ids[dst] = ids[dst + 1]  # the right-hand side is gathered (copied) before the write
    has = lengths > 0
    if not bool(has.any()):
        return
    if select_index is not None:
        where = select_index.reshape(-1)[:bs].to(_I64)[has]
    else:
        where = (start + lengths - 1)[has]
    _check_in(where, 0, ids.numel(), "input_ids index")
    new = topk_index.reshape(-1)[:bs][has]
    ids[where] = new.to(ids.dtype)
