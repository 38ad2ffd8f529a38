"""Per-(request, KV head) decode attention over lists of cells of the flat single-head view.

Layout (``docs/design.md``, "Memory layout"). SGLang's KV pool holds per layer ``k_buffer[l]`` of shape
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
:func:`.pair_indices.build_pair_indices` builds the CSR for a batch; the torch, Triton and
FlashInfer paths all consume its output.

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

import torch
from torch import Tensor

from .dispatch import resolve_impl
from .threads import cpu_threads_for

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_torch",
    "DEFAULT_KEY_CHUNK",
]

# Keys per chunk of the torch decode path. Memory per chunk: n_active_pairs x chunk x D
# for K and for V (in fp32), plus n_active_pairs x g x chunk scores.
DEFAULT_KEY_CHUNK = 512
_MIN_CHUNK = 32


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
    with cpu_threads_for(kv_indices.numel() * q.shape[-1], q.device):
        return _decode_torch(q, k_flat, v_flat, kv_indptr, kv_indices, sm_scale, key_chunk)


def _decode_torch(q, k_flat, v_flat, kv_indptr, kv_indices, sm_scale, key_chunk):
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
