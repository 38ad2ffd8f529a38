"""Per-(request, KV head) decode attention over lists of cells of the flat single-head view.

Layout (DESIGN.md section 5). SGLang's KV pool holds per layer ``k_buffer[l]`` of shape
``[slots, Hkv, D]``, contiguous, so ``k_flat = k_buffer[l].view(-1, D)`` is a single-head
view in which *cell* ``slot * Hkv + h`` is the key of token slot ``slot``, KV head ``h``.
Decode attention runs one row per *pair* (request ``r``, KV head ``h``), pair index
``r * Hkv + h``, with the ``g = Hq / Hkv`` query heads of that KV group
(``q.view(bs, Hkv, g, D).reshape(bs * Hkv, g, D)``: query head ``i`` reads KV head
``i // g``). Each pair reads a CSR list of cells (``kv_indptr`` / ``kv_indices``); this is
FlashInfer's paged layout with ``page_size = 1`` and one KV head.

For request ``r`` (shared prefix length ``P``, prompt length ``L``, current length ``S``)
and KV head ``h`` the list is, in this order::

    row[0:P] * Hkv + h            shared prefix cells
    compressed cells of (l, h)    absolute cell ids, as kept by the repack
    row[L:S] * Hkv + h            decode cells

An uncompressed request is the same with ``P = L = S`` (everything in the "prefix"
segment) and no compressed cells, so a mixed batch is one code path.
:func:`build_pair_indices` builds the CSR for a batch; the torch, Triton and FlashInfer
paths all consume its output.

Implementations of :func:`paged_decode_attention`:

* ``"torch"`` (:func:`paged_decode_attention_torch`): batched torch, no Python loop over
  pairs, heads or tokens; pairs sorted by length, keys processed in chunks (32, 32, 64, ...
  up to ``DEFAULT_KEY_CHUNK``) with an online softmax, so memory stays bounded and a pair is
  padded to at most about twice its length; fp32 accumulation. This is the CPU engine's decode path and the reference of the others.
* ``"triton"``: split-K (flash-decoding) kernel plus a reduce kernel
  (:mod:`._triton_decode`).
* ``"flashinfer"``: :mod:`.flashinfer_decode` (untested on hardware).

Engine-free: never imports SGLang.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .dispatch import resolve_impl

__all__ = [
    "PairIndices",
    "gather_row_ranges",
    "build_pair_indices",
    "build_pair_indices_from_lists",
    "paged_decode_attention",
    "paged_decode_attention_torch",
    "DEFAULT_KEY_CHUNK",
]

# Keys per chunk of the torch decode path. Memory per chunk: n_active_pairs x chunk x D
# for K and for V (in fp32), plus n_active_pairs x g x chunk scores.
DEFAULT_KEY_CHUNK = 512
_MIN_CHUNK = 32


class PairIndices(NamedTuple):
    """CSR lists of cells, one list per (request, KV head) pair (pair = ``r * Hkv + h``)."""

    kv_indptr: Tensor  # [n_pairs + 1] int32
    kv_indices: Tensor  # [nnz] cell ids (int64 by default, int32 for FlashInfer)

    @property
    def n_pairs(self) -> int:
        return self.kv_indptr.numel() - 1

    def lengths(self) -> Tensor:
        return (self.kv_indptr[1:] - self.kv_indptr[:-1]).to(torch.long)


def _as_long(x, device) -> Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device)


def _segment_ids(lens: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """For CSR lengths ``lens [n]``: (segment id of every element, position inside its segment)."""
    n = lens.numel()
    if total is None:
        total = int(lens.sum()) if n else 0
    seg = torch.repeat_interleave(torch.arange(n, device=lens.device), lens, output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(total, device=lens.device) - starts[seg]
    return seg, pos


def gather_row_ranges(req_to_token: Tensor, rows, starts, ends) -> tuple[Tensor, Tensor]:
    """Slots ``req_to_token[rows[r], starts[r]:ends[r]]`` of every request, concatenated.

    Vectorized (no Python loop over requests). ``rows``, ``starts``, ``ends``: ``[R]``
    (tensors or sequences). Returns ``(slots [sum(ends - starts)] int64, lens [R] int64)``.
    """
    device = req_to_token.device
    rows, starts, ends = (_as_long(x, device) for x in (rows, starts, ends))
    lens = (ends - starts).clamp_min(0)
    seg, pos = _segment_ids(lens)
    flat = rows[seg] * req_to_token.stride(0) + (starts[seg] + pos) * req_to_token.stride(1)
    base = req_to_token.as_strided((req_to_token.numel(),), (1,)) if req_to_token.is_contiguous() else None
    if base is not None:
        slots = base.index_select(0, flat).to(torch.long)
    else:
        slots = req_to_token[rows[seg], starts[seg] + pos].to(torch.long)
    return slots, lens


def build_pair_indices(
    num_kv_heads: int,
    prefix_slots: Tensor,
    prefix_lens: Tensor,
    suffix_slots: Tensor | None = None,
    suffix_lens: Tensor | None = None,
    mid_cells: Tensor | None = None,
    mid_lens: Tensor | None = None,
    *,
    index_dtype: torch.dtype = torch.int64,
    cell_base: int | Tensor = 0,
) -> PairIndices:
    """CSR cell lists of a batch of ``R`` requests x ``Hkv`` KV heads (one layer). Vectorized.

    * ``prefix_slots [sum(prefix_lens)]``, ``prefix_lens [R]``: slots of the segment read in
      every head before the compressed cells (the shared prefix ``row[0:P]``; for an
      uncompressed request the whole ``row[0:S]``). Cell = ``cell_base + slot * Hkv + h``
      (``cell_base``: the layer's first cell in a flat view over all layers, ``engine.cells``;
      0 for a view of the layer's own buffer; a ``[R]`` tensor gives each request its own, so
      one call can build the lists of several layers, one "request" per (layer, request)).
    * ``mid_cells [sum(mid_lens)]``, ``mid_lens [R, Hkv]``: the compressed cells of each
      (request, head) of this layer, already absolute cell ids, concatenated request-major
      then head-major. ``None`` = no compressed cells in the batch.
    * ``suffix_slots [sum(suffix_lens)]``, ``suffix_lens [R]``: slots read after the
      compressed cells (the decode tokens ``row[L:S]``). ``None`` = empty.

    Returns :class:`PairIndices` with ``kv_indptr`` int32 ``[R * Hkv + 1]`` and
    ``kv_indices`` of ``index_dtype``; pair ``r * Hkv + h`` reads prefix, mid, suffix in order.
    """
    H = int(num_kv_heads)
    device = prefix_slots.device
    prefix_lens = _as_long(prefix_lens, device)
    R = prefix_lens.numel()
    if suffix_lens is None:
        suffix_lens = torch.zeros(R, dtype=torch.long, device=device)
        suffix_slots = torch.zeros(0, dtype=torch.long, device=device)
    suffix_lens = _as_long(suffix_lens, device)
    if mid_lens is None:
        mid_lens = torch.zeros((R, H), dtype=torch.long, device=device)
        mid_cells = torch.zeros(0, dtype=torch.long, device=device)
    mid_lens = _as_long(mid_lens, device).reshape(R, H)

    head = torch.arange(H, device=device)
    per_request_base = isinstance(cell_base, Tensor)
    if per_request_base:
        cell_base = _as_long(cell_base, device)
    pair_lens = prefix_lens[:, None] + mid_lens + suffix_lens[:, None]  # [R, H]
    flat_lens = pair_lens.reshape(-1)
    indptr = torch.zeros(R * H + 1, dtype=torch.long, device=device)
    torch.cumsum(flat_lens, 0, out=indptr[1:])
    total = int(indptr[-1]) if R else 0
    indices = torch.empty(total, dtype=index_dtype, device=device)
    starts = indptr[:-1].view(R, H)

    # shared segment before the compressed cells: [n, H] block, cell = slot * H + h
    if prefix_slots.numel():
        r, j = _segment_ids(prefix_lens, prefix_slots.numel())
        dest = starts[r] + j[:, None]
        base = cell_base[r, None] if per_request_base else cell_base
        indices.index_copy_(0, dest.reshape(-1), (prefix_slots.to(torch.long)[:, None] * H + head + base).reshape(-1).to(index_dtype))
    # compressed cells, per (request, head)
    if mid_cells is not None and mid_cells.numel():
        p, j = _segment_ids(mid_lens.reshape(-1), mid_cells.numel())
        dest = indptr[p] + prefix_lens[p // H] + j
        indices.index_copy_(0, dest, mid_cells.to(index_dtype))
    # decode cells after them
    if suffix_slots is not None and suffix_slots.numel():
        r, j = _segment_ids(suffix_lens, suffix_slots.numel())
        dest = starts[r] + prefix_lens[r, None] + mid_lens[r] + j[:, None]
        base = cell_base[r, None] if per_request_base else cell_base
        indices.index_copy_(0, dest.reshape(-1), (suffix_slots.to(torch.long)[:, None] * H + head + base).reshape(-1).to(index_dtype))
    return PairIndices(indptr.to(torch.int32), indices)


def append_pair_cells(pairs: PairIndices, cells: Tensor) -> PairIndices:
    """``pairs`` with ``cells[p]`` appended at the end of pair ``p``'s list (one new cell per
    pair: the next decode step's own token). O(nnz) copies, no gather and no host sync."""
    n = pairs.n_pairs
    device = pairs.kv_indices.device
    if cells.numel() != n:
        raise ValueError(f"append_pair_cells: {cells.numel()} cells for {n} pairs")
    indptr = pairs.kv_indptr + torch.arange(n + 1, dtype=pairs.kv_indptr.dtype, device=device)
    out = torch.empty(pairs.kv_indices.numel() + n, dtype=pairs.kv_indices.dtype, device=device)
    ends = indptr[1:].to(torch.long) - 1
    old = torch.ones(out.numel(), dtype=torch.bool, device=device)
    old[ends] = False
    out[old] = pairs.kv_indices
    out[ends] = cells.to(out.dtype)
    return PairIndices(indptr, out)


def build_pair_indices_from_lists(
    num_kv_heads: int,
    prefix_slots: Sequence[Tensor],
    mid_cells: Sequence[Sequence[Tensor] | None] | None = None,
    suffix_slots: Sequence[Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    index_dtype: torch.dtype = torch.int64,
) -> PairIndices:
    """:func:`build_pair_indices` from per-request pieces.

    ``prefix_slots[r]``: slots of request ``r`` read first in every head; ``mid_cells[r]``:
    ``None`` (uncompressed) or a sequence of ``Hkv`` cell-id tensors of this layer;
    ``suffix_slots[r]``: slots read last. Only a Python loop over requests (to concatenate).
    """
    H = int(num_kv_heads)
    R = len(prefix_slots)
    if device is None:
        device = prefix_slots[0].device if R else torch.device("cpu")
    empty = torch.zeros(0, dtype=torch.long, device=device)

    def cat(xs):
        xs = [x.to(device=device, dtype=torch.long).reshape(-1) for x in xs]
        return torch.cat(xs) if xs else empty

    pre = cat(prefix_slots)
    pre_lens = torch.tensor([int(x.numel()) for x in prefix_slots], dtype=torch.long, device=device)
    suf = suf_lens = None
    if suffix_slots is not None:
        assert len(suffix_slots) == R
        suf = cat(suffix_slots)
        suf_lens = torch.tensor([int(x.numel()) for x in suffix_slots], dtype=torch.long, device=device)
    mid = mid_lens = None
    if mid_cells is not None and any(m is not None for m in mid_cells):
        assert len(mid_cells) == R
        pieces, lens = [], []
        for m in mid_cells:
            if m is None:
                lens.append([0] * H)
                continue
            assert len(m) == H, f"expected {H} per-head cell lists, got {len(m)}"
            pieces.extend(m)
            lens.append([int(x.numel()) for x in m])
        mid = cat(pieces)
        mid_lens = torch.tensor(lens, dtype=torch.long, device=device).reshape(R, H)
    return build_pair_indices(H, pre, pre_lens, suf, suf_lens, mid, mid_lens, index_dtype=index_dtype)


# Below this many padded key elements (pairs x longest list x D; 16M fp32 = 64 MB for K, the
# same for V) the torch path gathers every list at once, padded to the longest: a dozen torch
# ops per layer instead of ~15 per key chunk, which is what dominates a CPU decode step.
_SINGLE_SHOT_ELEMS = 1 << 24


def _pad_groups(lens_desc: list, lo: int, hi: int, depth: int = 2) -> list:
    """Split pairs ``[lo, hi)``, sorted by descending length, into groups each padded to its own
    longest list: the cut that minimises the padded key count, kept only when it saves a third
    of the group's padding (about what a group's dozen torch ops cost at these sizes), then the
    same within each half, ``depth`` levels deep (at most ``2**depth`` groups)."""
    n = hi - lo
    if depth == 0 or n < 2:
        return [(lo, hi)]
    one = n * lens_desc[lo]
    best, cut = one, 0
    for i in range(lo + 1, hi):
        padded = (i - lo) * lens_desc[lo] + (hi - i) * lens_desc[i]
        if padded < best:
            best, cut = padded, i
    if not cut or best >= one * 2 / 3:
        return [(lo, hi)]
    return _pad_groups(lens_desc, lo, cut, depth - 1) + _pad_groups(lens_desc, cut, hi, depth - 1)


def _single_shot(qs, k_flat, v_flat, indices, starts, lens_sorted, order, max_len, n_nonempty, sm_scale, out):
    D = qs.shape[-1]
    pos = torch.arange(max_len, device=qs.device)
    lens = lens_sorted[:n_nonempty, None]
    valid = pos[None, :] < lens  # [n, max_len]
    where = (starts[:n_nonempty, None] + pos[None, :]).where(valid, starts[:n_nonempty, None]).reshape(-1)
    cells = indices.index_select(0, where)
    kc = k_flat.index_select(0, cells).view(n_nonempty, max_len, D).to(torch.float32)
    vc = v_flat.index_select(0, cells).view(n_nonempty, max_len, -1).to(torch.float32)
    s = torch.bmm(qs[:n_nonempty], kc.transpose(1, 2)).mul_(sm_scale)  # [n, g, max_len]
    s.masked_fill_(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out[order[:n_nonempty]] = torch.bmm(p, vc)
    return out


def paged_decode_attention_torch(
    q: Tensor,
    k_flat: Tensor,
    v_flat: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    sm_scale: float,
    *,
    key_chunk: int = DEFAULT_KEY_CHUNK,
) -> Tensor:
    """Batched torch decode attention (see the module docstring). fp32 accumulation.

    ``q [n_pairs, g, D]``, ``k_flat`` / ``v_flat [C, D]``; returns ``[n_pairs, g, D]`` in
    ``q.dtype``; pairs with an empty list get zeros.

    Pairs are sorted by length (descending) so that, for a key chunk starting at ``c0``, the
    pairs that still have keys are a prefix of the order; each chunk is one gather + ``bmm``
    + online-softmax update over those pairs only. Chunks double in size from 32 keys up to
    ``key_chunk``, so short pairs next to long ones are padded by at most about 2x.
    """
    n_pairs, g, D = q.shape
    out = torch.zeros((n_pairs, g, D), dtype=torch.float32, device=q.device)
    if n_pairs == 0 or kv_indices.numel() == 0:
        return out.to(q.dtype)
    indptr = kv_indptr.to(device=q.device, dtype=torch.long)
    lens = indptr[1:] - indptr[:-1]
    lens_sorted, order = torch.sort(lens, descending=True, stable=True)
    lens_host = lens_sorted.tolist()
    max_len = lens_host[0]
    n_nonempty = sum(1 for x in lens_host if x > 0)
    starts = indptr[:-1][order]
    qs = q[order].to(torch.float32)  # [n, g, D]
    indices = kv_indices.to(torch.long)

    if n_nonempty * max_len * D <= _SINGLE_SHOT_ELEMS:
        # Uneven lists (LAVa's and AdaKV's per-head budgets) padded to the longest would waste
        # most of the gather: pairs in groups of similar length, each padded to its own longest.
        # (O(pairs) host work per layer on lengths already on the host; one group when even)
        for a, b in _pad_groups(lens_host, 0, n_nonempty):
            _single_shot(qs[a:b], k_flat, v_flat, indices, starts[a:b], lens_sorted[a:b], order[a:b], lens_host[a],
                         b - a, sm_scale, out)
        return out.to(q.dtype)

    key_chunk = max(1, int(key_chunk))
    m = torch.full((n_nonempty, g), float("-inf"), dtype=torch.float32, device=q.device)
    l = torch.zeros((n_nonempty, g), dtype=torch.float32, device=q.device)
    acc = torch.zeros((n_nonempty, g, D), dtype=torch.float32, device=q.device)
    ar = torch.arange(key_chunk, device=q.device)
    n_act = n_nonempty
    c0 = 0
    while c0 < max_len:
        # chunk boundaries 0, 32, 64, 128, ... then every key_chunk: a pair of length L is
        # padded to at most max(2L, L + key_chunk, 32), whatever the other lengths
        chunk = min(key_chunk, max(_MIN_CHUNK, c0))
        while n_act > 0 and lens_host[n_act - 1] <= c0:  # pairs with no key left
            n_act -= 1
        pos = c0 + ar[:chunk]  # [chunk]
        valid = pos[None, :] < lens_sorted[:n_act, None]  # [n_act, chunk]
        # (index_select: much faster than advanced indexing on CPU)
        where = (starts[:n_act, None] + pos[None, :]).where(valid, starts[:n_act, None]).reshape(-1)
        cells = indices.index_select(0, where)
        kc = k_flat.index_select(0, cells).view(n_act, -1, D).to(torch.float32)  # [n_act, chunk, D]
        vc = v_flat.index_select(0, cells).view(n_act, -1, D).to(torch.float32)
        s = torch.bmm(qs[:n_act], kc.transpose(1, 2)).mul_(sm_scale)  # [n_act, g, chunk]
        s.masked_fill_(~valid[:, None, :], float("-inf"))
        # every active pair has at least one valid key in this chunk: no all -inf row
        m_new = torch.maximum(m[:n_act], s.amax(dim=-1))
        alpha = torch.exp(m[:n_act] - m_new)
        p = torch.exp(s - m_new[..., None])
        l[:n_act] = l[:n_act] * alpha + p.sum(dim=-1)
        acc[:n_act] = acc[:n_act] * alpha[..., None] + torch.bmm(p, vc)
        m[:n_act] = m_new
        c0 += chunk
    res = acc / l[..., None]
    out[order[:n_nonempty]] = res
    return out.to(q.dtype)


def paged_decode_attention(
    q: Tensor,
    k_flat: Tensor,
    v_flat: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    sm_scale: float,
    impl: str = "auto",
) -> Tensor:
    """Decode attention of ``g`` query heads per pair over its list of cells.

    ``q [n_pairs, g, D]``; ``k_flat`` / ``v_flat [C, D]`` (flat single-head views of one
    layer); ``kv_indptr [n_pairs + 1]`` (int32/int64); ``kv_indices [nnz]`` cell ids
    (int32/int64). Returns ``[n_pairs, g, D]`` in ``q.dtype``; length-0 lists give zeros.
    ``impl``: ``"auto" | "torch" | "triton" | "flashinfer"`` (see :mod:`.dispatch`).
    """
    if q.dim() != 3 or k_flat.dim() != 2 or v_flat.dim() != 2:
        raise ValueError(f"q must be [n_pairs, g, D] and k/v [C, D]; got {tuple(q.shape)}, {tuple(k_flat.shape)}, {tuple(v_flat.shape)}")
    if kv_indptr.numel() != q.shape[0] + 1:
        raise ValueError(f"kv_indptr has {kv_indptr.numel()} entries for {q.shape[0]} pairs")
    which = resolve_impl("decode", q.device, impl, dtype=k_flat.dtype)
    if which == "torch":
        return paged_decode_attention_torch(q, k_flat, v_flat, kv_indptr, kv_indices, sm_scale)
    if which == "triton":
        from ._triton_decode import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_flat, v_flat, kv_indptr, kv_indices, sm_scale)
    from .flashinfer_decode import paged_decode_attention_flashinfer

    return paged_decode_attention_flashinfer(q, k_flat, v_flat, kv_indptr, kv_indices, sm_scale)
