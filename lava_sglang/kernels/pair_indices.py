"""CSR cell lists of (request, KV head) pairs: the one index builder of every attention
back-end (torch, Triton, FlashInfer; decode and extend) and of the engine's layouts.

A *pair* is (request ``r``, KV head ``h``), pair index ``r * Hkv + h``; its list is
``kv_indices[kv_indptr[p]:kv_indptr[p + 1]]``, cell ids of a flat single-head view of the KV
pool (``docs/design.md``, "Memory layout" and "Decode index"). For request ``r`` (shared prefix
``P``, prompt ``L``, length ``S``) and head ``h`` the list is ``row[0:P] * Hkv + h``, the kept
cells of (layer, ``h``), then ``row[L:S] * Hkv + h``; an uncompressed request has ``P = L = S``.

* :func:`gather_row_ranges`, :func:`build_pair_indices` (vectorized, one or many layers per
  call), :func:`build_pair_indices_from_lists` (from per-request pieces);
* :func:`append_pair_cells`: the next decode step's lists (one new cell per pair);
* :func:`extend_lengths`: the checked host copy of an extend batch's query / key lengths.

Engine-free: never imports SGLang, Triton or FlashInfer.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "PairIndices",
    "to_device",
    "ExtendLengths",
    "gather_row_ranges",
    "build_pair_indices",
    "build_pair_indices_from_lists",
    "append_pair_cells",
    "extend_lengths",
    "segment_ids",
]


class PairIndices(NamedTuple):
    """CSR lists of cells, one list per (request, KV head) pair (pair = ``r * Hkv + h``)."""

    kv_indptr: Tensor  # [n_pairs + 1] int32
    kv_indices: Tensor  # [nnz] cell ids (int64 by default, int32 for FlashInfer)

    @property
    def n_pairs(self) -> int:
        return self.kv_indptr.numel() - 1

    def lengths(self) -> Tensor:
        return (self.kv_indptr[1:] - self.kv_indptr[:-1]).to(torch.long)


def to_device(x: Tensor, device) -> Tensor:
    """``x`` on ``device`` without a host sync. A blocking copy from the host synchronizes the
    CUDA stream (PyTorch's ``memcpy_and_sync``), so a host tensor goes to a GPU from pinned
    memory, non-blocking (PyTorch's caching host allocator keeps the pinned block until the
    copy ran). A no-op when ``x`` is on ``device`` already."""
    device = torch.device(device)
    if x.device.type != "cpu":
        return x.to(device)
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def _as_long(x, device) -> Tensor:
    """``x`` (a tensor or a Python sequence) as int64 on ``device``, without a host sync."""
    x = x.to(torch.long) if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.long)
    return to_device(x, device)


def segment_ids(lens: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
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
    With ``starts`` and ``ends`` given as Python sequences the total is summed on the host
    (no host sync on a GPU); with tensors it is read from the device.
    """
    device = req_to_token.device
    total = None
    if not isinstance(starts, Tensor) and not isinstance(ends, Tensor):
        total = sum(max(0, int(e) - int(s)) for s, e in zip(starts, ends))
    rows, starts, ends = (_as_long(x, device) for x in (rows, starts, ends))
    lens = (ends - starts).clamp_min(0)
    seg, pos = segment_ids(lens, total)
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
    nnz: int | None = None,
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
    ``nnz``: the total list length when the caller knows it on the host (otherwise read from
    the device: one host sync on a GPU); it must equal the sum of the lengths.
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
    total = (int(nnz) if nnz is not None else int(indptr[-1])) if R else 0
    indices = torch.empty(total, dtype=index_dtype, device=device)
    starts = indptr[:-1].view(R, H)

    # shared segment before the compressed cells: [n, H] block, cell = slot * H + h
    if prefix_slots.numel():
        r, j = segment_ids(prefix_lens, prefix_slots.numel())
        dest = starts[r] + j[:, None]
        base = cell_base[r, None] if per_request_base else cell_base
        indices.index_copy_(0, dest.reshape(-1), (prefix_slots.to(torch.long)[:, None] * H + head + base).reshape(-1).to(index_dtype))
    # compressed cells, per (request, head)
    if mid_cells is not None and mid_cells.numel():
        p, j = segment_ids(mid_lens.reshape(-1), mid_cells.numel())
        dest = indptr[p] + prefix_lens[p // H] + j
        indices.index_copy_(0, dest, mid_cells.to(index_dtype))
    # decode cells after them
    if suffix_slots is not None and suffix_slots.numel():
        r, j = segment_ids(suffix_lens, suffix_slots.numel())
        dest = starts[r] + prefix_lens[r, None] + mid_lens[r] + j[:, None]
        base = cell_base[r, None] if per_request_base else cell_base
        indices.index_copy_(0, dest.reshape(-1), (suffix_slots.to(torch.long)[:, None] * H + head + base).reshape(-1).to(index_dtype))
    return PairIndices(indptr.to(torch.int32), indices)


def append_pair_cells(pairs: PairIndices, cells: Tensor) -> PairIndices:
    """``pairs`` with ``cells[p]`` appended at the end of pair ``p``'s list (one new cell per
    pair: the next decode step's own token). O(nnz) copies, no gather and no host sync: the old
    cells go where a mask says (``masked_scatter_``, whose CUDA version checks its sizes on the
    device; indexing with a boolean mask would read the mask's count back to the host)."""
    n = pairs.n_pairs
    device = pairs.kv_indices.device
    if cells.numel() != n:
        raise ValueError(f"append_pair_cells: {cells.numel()} cells for {n} pairs")
    indptr = pairs.kv_indptr + torch.arange(n + 1, dtype=pairs.kv_indptr.dtype, device=device)
    out = torch.empty(pairs.kv_indices.numel() + n, dtype=pairs.kv_indices.dtype, device=device)
    ends = indptr[1:].to(torch.long) - 1
    old = torch.ones(out.numel(), dtype=torch.bool, device=device)
    old[ends] = False
    out.masked_scatter_(old, pairs.kv_indices)
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


class ExtendLengths(NamedTuple):
    """Host copies of the per-pair lengths (Python lists), checked."""

    qo_starts: list
    qo_lens: list
    kv_lens: list

    @property
    def max_qo(self) -> int:
        return max(self.qo_lens, default=0)


def extend_lengths(qo_indptr: Tensor, kv_indptr: Tensor, nq_total: int | None = None) -> ExtendLengths:
    """Reads both CSR indptrs to the host (one sync on a GPU) and checks them: same number of
    pairs, non-decreasing, ``qo_indptr[-1] == nq_total`` (when given) and ``kv_len >= qo_len``
    for every pair. Raises ``ValueError`` naming the offending pair."""
    if qo_indptr.dim() != 1 or kv_indptr.dim() != 1:
        raise ValueError(f"qo_indptr / kv_indptr must be 1-D; got {tuple(qo_indptr.shape)}, {tuple(kv_indptr.shape)}")
    if qo_indptr.numel() != kv_indptr.numel():
        raise ValueError(f"qo_indptr has {qo_indptr.numel()} entries but kv_indptr has {kv_indptr.numel()} (both n_pairs + 1)")
    if qo_indptr.numel() == 0:
        raise ValueError("qo_indptr / kv_indptr need n_pairs + 1 >= 1 entries")
    qo = qo_indptr.detach().to("cpu", torch.long)
    kv = kv_indptr.detach().to("cpu", torch.long)
    qo_lens_t = qo[1:] - qo[:-1]
    kv_lens_t = kv[1:] - kv[:-1]
    if int(qo[0]) != 0 or int(kv[0]) != 0:
        raise ValueError(f"qo_indptr and kv_indptr must start at 0; got {int(qo[0])}, {int(kv[0])}")
    if (qo_lens_t < 0).any():
        p = int(torch.nonzero(qo_lens_t < 0)[0])
        raise ValueError(f"qo_indptr decreases at pair {p}")
    if (kv_lens_t < 0).any():
        p = int(torch.nonzero(kv_lens_t < 0)[0])
        raise ValueError(f"kv_indptr decreases at pair {p}")
    if nq_total is not None and int(qo[-1]) != int(nq_total):
        raise ValueError(f"qo_indptr[-1] = {int(qo[-1])} but q has {int(nq_total)} rows")
    bad = kv_lens_t < qo_lens_t
    if bad.any():
        p = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"pair {p}: {int(qo_lens_t[p])} queries but only {int(kv_lens_t[p])} cells "
            "(extend attention needs kv_len >= qo_len: the list must end with the new tokens' cells)"
        )
    return ExtendLengths(qo[:-1].tolist(), qo_lens_t.tolist(), kv_lens_t.tolist())
