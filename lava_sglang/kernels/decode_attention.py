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
* ``"flashinfer"``: :mod:`.flashinfer_decode` (untested on hardware; lists built int32).

Engine-free: never imports SGLang.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import resolve_impl
from .pair_indices import PairIndices, to_device
from .threads import cpu_threads_for

__all__ = [
    "DecodePlan",
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


class _TorchDecodeLayer:
    """The torch twin's plan of one layer's lists: pairs sorted by length (descending), their
    lengths on the host, the pad groups of the single-shot path (each with its gathered cell
    ids and validity mask) or the chunk schedule of the online-softmax path."""

    def __init__(self, pairs: PairIndices, head_dim: int, key_chunk: int = DEFAULT_KEY_CHUNK,
                 sorted_lens: tuple | None = None):
        indptr = pairs.kv_indptr.to(torch.long)
        self.n_pairs = pairs.n_pairs
        self.key_chunk = max(1, int(key_chunk))
        if sorted_lens is None:  # (lens_sorted, order, host copy), else sorted here
            lens_sorted, order = torch.sort(indptr[1:] - indptr[:-1], descending=True, stable=True)
            sorted_lens = (lens_sorted, order, lens_sorted.tolist())
        self.lens_sorted, self.order, self.lens_host = sorted_lens
        self.n = sum(1 for x in self.lens_host if x > 0)
        self.max_len = self.lens_host[0] if self.lens_host else 0
        self.starts = indptr[:-1][self.order]
        self.indices = pairs.kv_indices.to(torch.long)
        self.groups = None
        if self.n and self.n * self.max_len * head_dim <= _SINGLE_SHOT_ELEMS:
            # Uneven lists (LAVa's and AdaKV's per-head budgets) padded to the longest would
            # waste most of the gather: pairs in groups of similar length, each padded to its
            # own longest (one group when even)
            self.groups = []
            for a, b in _pad_groups(self.lens_host, 0, self.n):
                pos = torch.arange(self.lens_host[a], device=indptr.device)
                valid = pos[None, :] < self.lens_sorted[a:b, None]  # [b - a, longest]
                where = (self.starts[a:b, None] + pos[None, :]).where(valid, self.starts[a:b, None]).reshape(-1)
                self.groups.append((a, b, self.indices.index_select(0, where), ~valid[:, None, :]))

    def run(self, q: Tensor, k_flat: Tensor, v_flat: Tensor, sm_scale: float) -> Tensor:
        n_pairs, g, D = q.shape
        out = torch.zeros((n_pairs, g, v_flat.shape[-1]), dtype=torch.float32, device=q.device)
        if self.n == 0:
            return out.to(q.dtype)
        qs = q[self.order[:self.n]].to(torch.float32)  # [n, g, D]
        if self.groups is not None:
            for a, b, cells, hidden in self.groups:
                kc = k_flat.index_select(0, cells).view(b - a, -1, D).to(torch.float32)
                vc = v_flat.index_select(0, cells).view(b - a, kc.shape[1], -1).to(torch.float32)
                s = torch.bmm(qs[a:b], kc.transpose(1, 2)).mul_(sm_scale)  # [b - a, g, longest]
                s.masked_fill_(hidden, float("-inf"))
                out[self.order[a:b]] = torch.bmm(torch.softmax(s, dim=-1), vc)
            return out.to(q.dtype)
        out[self.order[:self.n]] = self._chunked(qs, k_flat, v_flat, sm_scale)
        return out.to(q.dtype)

    def _chunked(self, qs, k_flat, v_flat, sm_scale):
        n, g, D = qs.shape
        lens_host, key_chunk = self.lens_host, self.key_chunk
        m = torch.full((n, g), float("-inf"), dtype=torch.float32, device=qs.device)
        l = torch.zeros((n, g), dtype=torch.float32, device=qs.device)
        acc = torch.zeros((n, g, v_flat.shape[-1]), dtype=torch.float32, device=qs.device)
        ar = torch.arange(key_chunk, device=qs.device)
        n_act, c0 = n, 0
        while c0 < self.max_len:
            # chunk boundaries 0, 32, 64, 128, ... then every key_chunk: a pair of length L is
            # padded to at most max(2L, L + key_chunk, 32), whatever the other lengths
            chunk = min(key_chunk, max(_MIN_CHUNK, c0))
            while n_act > 0 and lens_host[n_act - 1] <= c0:  # pairs with no key left
                n_act -= 1
            pos = c0 + ar[:chunk]  # [chunk]
            valid = pos[None, :] < self.lens_sorted[:n_act, None]  # [n_act, chunk]
            # (index_select: much faster than advanced indexing on CPU)
            where = (self.starts[:n_act, None] + pos[None, :]).where(valid, self.starts[:n_act, None]).reshape(-1)
            cells = self.indices.index_select(0, where)
            kc = k_flat.index_select(0, cells).view(n_act, -1, D).to(torch.float32)  # [n_act, chunk, D]
            vc = v_flat.index_select(0, cells).view(n_act, kc.shape[1], -1).to(torch.float32)
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
        return acc / l[..., None]


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
    pairs = PairIndices(kv_indptr.to(q.device), kv_indices.to(q.device))
    with cpu_threads_for(kv_indices.numel() * q.shape[-1], q.device):
        return _TorchDecodeLayer(pairs, q.shape[-1], key_chunk).run(q, k_flat, v_flat, sm_scale)


class DecodePlan:
    """Decode attention planned once per forward and run per layer, the split of FlashInfer's
    ``BatchDecodeWithPagedKVCacheWrapper`` (``plan`` / ``run``).

    :meth:`plan` takes the lists of one or more layers (``{layer: PairIndices}``) and does the
    work that depends only on them; :meth:`run` computes one layer. Per implementation:

    * torch: every planned layer's lengths sorted in one ``sort`` and read to the host in one
      go, the pad groups and their gathered cell ids; ``run`` gathers keys and values and does
      the two ``bmm`` (small work on one CPU thread, :mod:`.threads`);
    * triton: the split count and contiguous index tensors; ``run`` launches the two kernels;
    * flashinfer: the lists and their host indptrs. Each layer has its own lists (its own kept
      cells), and a FlashInfer plan serves one set of lists, so ``run`` plans its layer's
      wrapper (one per layer, :mod:`.flashinfer_decode`) from the host indptr and runs it.

    ``host_indptr`` (``{layer: kv_indptr on the host}``, from the index builder that knows
    every length there) spares the host read of the lengths: with it no implementation
    waits for the GPU; without it torch reads every planned layer's lengths in one go and
    FlashInfer each layer's indptr.
    """

    def __init__(self, device, head_dim: int, kv_dtype: torch.dtype | None = None, impl: str = "auto"):
        self.device = torch.device(device)
        self.head_dim = int(head_dim)
        self.impl = resolve_impl("decode", self.device, impl, dtype=kv_dtype)
        self.layers: dict = {}

    @property
    def index_dtype(self) -> torch.dtype:
        """The cell-id dtype the lists should be built in: int32 for FlashInfer (its page ids),
        int64 otherwise."""
        return torch.int32 if self.impl == "flashinfer" else torch.int64

    def plan(self, layers: dict, host_indptr: dict | None = None) -> "DecodePlan":
        todo = {l: p for l, p in layers.items() if l not in self.layers}
        if not todo:
            return self
        host_indptr = host_indptr or {}
        if self.impl != "torch":
            for l, pairs in todo.items():
                self.layers[l] = _gpu_layer_plan(self.impl, pairs, l, host_indptr.get(l))
            return self
        with cpu_threads_for(0, self.device):
            keys = list(todo)
            n = {todo[l].n_pairs for l in keys}
            if len(n) == 1 and n.pop() > 0:  # one sort and one host read for every layer
                if all(l in host_indptr for l in keys):  # sorted on the host: nothing read back
                    indptr = torch.stack([host_indptr[l].to(torch.long) for l in keys])
                else:
                    indptr = torch.stack([todo[l].kv_indptr.to(torch.long) for l in keys])
                lens_sorted, order = torch.sort(indptr[:, 1:] - indptr[:, :-1], dim=1, descending=True, stable=True)
                host = lens_sorted.tolist()
                lens_sorted, order = to_device(lens_sorted, self.device), to_device(order, self.device)
                for i, l in enumerate(keys):
                    self.layers[l] = _TorchDecodeLayer(todo[l], self.head_dim, sorted_lens=(lens_sorted[i], order[i], host[i]))
            else:
                for l in keys:
                    self.layers[l] = _TorchDecodeLayer(todo[l], self.head_dim)
        return self

    def run(self, layer: int, q: Tensor, k_flat: Tensor, v_flat: Tensor, sm_scale: float) -> Tensor:
        """``q [n_pairs, g, D]`` -> ``[n_pairs, g, Dv]`` over layer ``layer``'s planned lists."""
        planned = self.layers[layer]
        if self.impl != "torch":
            return planned(q, k_flat, v_flat, sm_scale)
        with cpu_threads_for(planned.indices.numel() * q.shape[-1], q.device):
            return planned.run(q, k_flat, v_flat, sm_scale)


def _gpu_layer_plan(impl: str, pairs: PairIndices, layer: int = 0, host_indptr: Tensor | None = None):
    """The Triton or FlashInfer run of one layer's lists, as a function of (q, k, v, scale)."""
    if impl == "triton":
        from ._triton_decode import default_num_splits, paged_decode_attention_triton

        indptr, indices = pairs.kv_indptr.contiguous(), pairs.kv_indices.contiguous()
        splits = default_num_splits(pairs.n_pairs, indices.numel(), 32)
        return lambda q, k, v, scale: paged_decode_attention_triton(q, k, v, indptr, indices, scale, num_splits=splits)
    from .flashinfer_decode import paged_decode_attention_flashinfer

    return lambda q, k, v, scale: paged_decode_attention_flashinfer(q, k, v, pairs.kv_indptr, pairs.kv_indices, scale,
                                                                    layer=layer, kv_indptr_host=host_indptr)


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
    plan = DecodePlan(q.device, q.shape[-1], k_flat.dtype, impl)
    return plan.plan({0: PairIndices(kv_indptr, kv_indices)}).run(0, q, k_flat, v_flat, sm_scale)
