"""Pure-torch stand-ins for the EAGLE tree entry points of ``sgl_kernel`` (speculative decoding).

Why speculative stand-ins exist at all: see :mod:`lava_sglang.cpu`. Semantics follow the GPU twin
named in each docstring (paths relative to ``sglang``):

* ``build_tree_kernel_efficient_cpu``: ``sgl_build_tree_kernel_efficient_triton``
  (``kernels/ops/speculative/spec_tree.py``); its bit-packed mask mode, which the Triton
  wrapper refuses, follows the CUDA ``build_tree_efficient_partial_packed``
  (``kernels/jit/include/sgl_kernel/speculative/eagle.cuh``);
* ``verify_tree_greedy_cpu``: ``verify_tree_greedy_kernel_triton`` (``spec_tree.py``).

Out-of-bounds indices raise ``ValueError`` instead of touching other rows.
"""

from __future__ import annotations

import torch

from lava_sglang.cpu.tensor_utils import I64, check_in, flat_view

# Tree mask layouts of build_tree_kernel_efficient (speculative::TreeMaskMode).
_FULL_MASK, _QLEN_ONLY, _QLEN_ONLY_BITPACKING = 0, 1, 2


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
    seq_len = verified_seq_len.reshape(bs).to(I64)
    sel = selected_index.reshape(bs, n - 1).to(I64)
    parents = (parent_list.reshape(1, -1) if parent_list.dim() == 1 else parent_list).to(I64)
    if parents.shape[0] != bs:
        raise ValueError(f"parent_list has {parents.shape[0]} rows for {bs} requests")
    for name, t in (("retrive_index", retrive_index), ("retrive_next_token", retrive_next_token),
                    ("retrive_next_sibling", retrive_next_sibling)):
        if tuple(t.shape) != (bs, n):
            raise ValueError(f"{name} must have shape {(bs, n)}, got {tuple(t.shape)}")
    positions_flat = flat_view(positions, "positions")
    if positions_flat.numel() < bs * n:
        raise ValueError(f"positions has {positions_flat.numel()} entries, {bs * n} needed")
    batch = torch.arange(bs, dtype=I64)

    # Parent of selected entry k (draft token k + 1): -1 root, -2 not found, else the k' of S[k'].
    parent_tb = torch.div(sel, topk, rounding_mode="trunc")
    is_root = parent_tb == 0
    par = torch.full((bs, n - 1), -1, dtype=I64)
    if n > 1 and not bool(is_root.all()):
        check_in(parent_tb[~is_root], 1, parents.shape[1], "parent_list index selected_index // topk")
        parent_token = parents[batch[:, None], torch.where(is_root, 1, parent_tb)]  # [bs, n-1]
        match = sel[:, None, :] == parent_token[:, :, None]  # [bs, k, k']
        found = match.any(-1)
        first = match.to(torch.int8).argmax(-1)  # first k' (argmax returns the first maximum)
        par = torch.where(is_root, par, torch.where(found, first, torch.full_like(first, -2)))

    # retrive_index
    retrive_index.copy_((batch[:, None] * n + torch.arange(n, dtype=I64)).to(retrive_index.dtype))

    # Child / sibling lists. Token i = k + 1 hangs under draft position pp[k] when linked[k].
    if n > 1:
        linked = par != -2
        pp = torch.where(is_root, 0, par + 1)  # [bs, n-1]
        tok = torch.arange(1, n, dtype=I64)  # token id of entry k
        big = n + 1
        # Later siblings: entries k2 > k with the same parent; the next sibling is the smallest.
        same = linked[:, :, None] & linked[:, None, :] & (pp[:, :, None] == pp[:, None, :])
        same &= tok[None, None, :] > tok[None, :, None]
        next_sib = torch.where(same, tok[None, None, :], big).amin(-1)  # [bs, n-1]
        has_sib = next_sib < big
        # First child of each draft position p: the smallest linked token under p.
        child = linked[:, None, :] & (pp[:, None, :] == torch.arange(n, dtype=I64)[None, :, None])
        first_child = torch.where(child, tok[None, None, :], big).amin(-1)  # [bs, n]
        has_child = first_child < big

        old_next = retrive_next_token.to(I64)
        old_sib = retrive_next_sibling[:, 1:].to(I64)
        origin = old_next[batch[:, None], pp.clamp(0, n - 1)]  # list head before this call
        new_sib = torch.where(has_sib, next_sib, torch.where(linked & (origin != -1), origin, old_sib))
        retrive_next_sibling[:, 1:] = new_sib.to(retrive_next_sibling.dtype)
        retrive_next_token.copy_(torch.where(has_child, first_child, old_next).to(retrive_next_token.dtype))

    # Ancestor walk: anc[b, x, c] = column c of draft token x's mask row; depth_of[b, x].
    anc = torch.zeros(bs, n, n, dtype=torch.bool)
    anc[:, :, 0] = True
    depth_of = torch.zeros(bs, n, dtype=I64)
    if n > 1:
        rows = torch.arange(1, n, dtype=I64)
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
        mask_bytes = flat_view(tree_mask, "tree_mask").view(torch.uint8)
        if mask_bytes.numel() < bs * n * nbytes:
            raise ValueError(f"tree_mask has {mask_bytes.numel()} bytes, {bs * n * nbytes} needed")
        weights = torch.tensor([1 << c for c in range(n)], dtype=I64)
        bits = (anc.to(I64) * weights).sum(-1).reshape(-1)  # [bs*n]
        shifts = torch.arange(nbytes, dtype=I64) * 8
        new = ((bits[:, None] >> shifts) & 0xFF).to(torch.uint8)  # [bs*n, nbytes]
        cells = mask_bytes[: bs * n * nbytes].view(bs * n, nbytes)
        cells[:, 1:] |= new[:, 1:]
        cells[:, 0] = new[:, 0]
        return

    mask_flat = flat_view(tree_mask, "tree_mask")
    if mode == _FULL_MASK:
        prefix = torch.cumsum(seq_len, 0) - seq_len
        row_start = (n * n * batch + n * prefix)[:, None] + (seq_len[:, None] + n) * torch.arange(n, dtype=I64)
        base = row_start + seq_len[:, None]  # [bs, n]: index of the root column of each row
        needed = int(seq_len.sum()) * n + bs * n * n
    else:
        base = (batch[:, None] * n + torch.arange(n, dtype=I64)) * n
        needed = bs * n * n
    if mask_flat.numel() < needed:
        raise ValueError(f"tree_mask has {mask_flat.numel()} elements, {needed} needed")
    index = (base[:, :, None] + torch.arange(n, dtype=I64)).reshape(-1)
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
    pred = flat_view(predicts, "predicts")
    ri = retrive_index.reshape(bs, n).to(I64)
    nt = retrive_next_token.reshape(bs, n).to(I64)
    ns = retrive_next_sibling.reshape(bs, n).to(I64)
    cand = candidates.to(I64)
    tp = target_predict.reshape(-1).to(I64)
    check_in(ri, 0, min(pred.numel(), tp.numel()), "retrive_index")
    check_in(nt, -1, n, "retrive_next_token")
    check_in(ns, -1, n, "retrive_next_sibling")
    batch = torch.arange(bs, dtype=I64)

    last = ri[:, 0].clone()
    accept_index[:, 0] = last.to(accept_index.dtype)
    count = torch.zeros(bs, dtype=I64)
    cur = torch.zeros(bs, dtype=I64)
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
