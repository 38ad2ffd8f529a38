"""Per-(request, KV head) extend (prefill) attention over lists of cells of the flat
single-head view: many query tokens per pair, causal aligned to the END of the list.

Layout: as :mod:`.decode_attention` (read its docstring first). A *pair* is (request ``r``,
KV head ``h``), pair index ``r * Hkv + h``; its keys are the CSR list of cells
``kv_indices[kv_indptr[p]:kv_indptr[p + 1]]`` of ``k_flat = k_buffer[l].view(-1, D)`` (built
by :func:`.pair_indices.build_pair_indices`). Its queries are the rows
``q[qo_indptr[p]:qo_indptr[p + 1]]`` of ``q [nq_total, g, D]`` (pair-major, the ``g`` query
heads of that KV group per row). For SGLang's extend batch ``q [T, Hq, D]`` of a request
with ``n`` new tokens the pair rows are ``q_r.view(n, Hkv, g, D).transpose(0, 1)``,
flattened request-major then head-major.

Semantics. Pair ``p`` has ``n_q`` queries and ``n_kv >= n_q`` cells; query ``i`` (0-based)
attends to cells ``0 .. n_kv - n_q + i`` of the list (bottom-right aligned causal mask,
FlashInfer's convention for causal prefill with ``kv_len >= qo_len``): the list ends with
the cells of the ``n_q`` new tokens, in order. With ``n_q = 1`` this is decode attention
(:func:`.decode_attention.paged_decode_attention_torch`). Softmax in fp32; the output is
``[nq_total, g, Dv]`` in ``q.dtype``. A pair with no queries contributes nothing.

One code path for decode (1 query per pair), extend over a compressed layout and
retraction replay.

Implementations of :func:`paged_extend_attention`:

* ``"torch"`` (:func:`paged_extend_attention_torch`): batched torch (no Python loop over
  pairs, heads or tokens), queries padded to the longest ``qo_len``, keys processed in
  chunks of at most ``min(key_chunk, 256)`` with an online softmax, query rows in tiles of
  about 512K scores, so memory is bounded by ``n_pairs x max_qo x g x key_chunk`` scores
  plus ``n_pairs x key_chunk x D`` keys (plus the padded queries and the fp32 accumulator,
  ``n_pairs x max_qo x g x (D + Dv)``); small problems take a one-shot dense path. The CPU
  engine's path and the twin of the others. On one CPU core it takes 1.1-1.6x the time of
  a dense ``F.scaled_dot_product_attention`` with an explicit mask over the same gathered
  keys (3 pairs x 500 queries x 2000 cells, g = 3, D = 64, fp32: ~51 ms vs ~37 ms).
* ``"triton"``: flash-attention style kernel (:mod:`._triton_extend`).
* ``"flashinfer"``: ``BatchPrefillWithPagedKVCacheWrapper`` glue (:mod:`.flashinfer_extend`;
  lists built int32).

Engine-free: never imports SGLang.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import resolve_impl
from .pair_indices import ExtendLengths, PairIndices, extend_lengths, to_device
from .threads import cpu_threads_for

__all__ = ["ExtendPlan", "paged_extend_attention", "paged_extend_attention_torch"]

# key chunks grow 64, 64, 128, 256, then stay at min(key_chunk, _MAX_CHUNK): a pair of
# length L next to longer ones is padded to at most max(2L, L + chunk, 64) keys. 256 keys per
# chunk measured faster on CPU than 512 or 1024 (less memory traffic per tile).
_MIN_CHUNK = 64
_MAX_CHUNK = 256
# Below this many padded score elements (pairs x max_qo x g x longest list) the torch path
# computes everything in one shot (gather all lists, one masked softmax): fewer torch ops.
# 1M fp32 = 4 MB of scores; above that the cache-sized tiles of the chunked path were faster
# on CPU (3 pairs x 100 queries x g=3 x 1000 keys: 12 ms one-shot, 10 ms chunked).
_SINGLE_SHOT_ELEMS = 1 << 20
# ... and at most this many gathered key (and value) elements (pairs x longest list x D):
# 8M fp32 = 32 MB each.
_SINGLE_SHOT_KEY_ELEMS = 1 << 23
# Scores per tile of the chunked path (pairs x query rows x g x keys): 512K fp32 = 2 MB, so
# a tile's softmax stays in cache.
_TILE_ELEMS = 1 << 19


def _one_shot(qs, k_flat, v_flat, indices, kv_starts, kv_lens, lim, max_len):
    """Dense masked attention of all pairs at once. ``qs [n, Mq, g, D]`` fp32 (padded),
    ``lim [n, Mq]`` last visible key (-1 for padding rows). Returns ``[n, Mq, g, Dv]``."""
    n, Mq, g, D = qs.shape
    pos = torch.arange(max_len, device=qs.device)
    in_list = pos[None, :] < kv_lens[:, None]  # [n, max_len]
    where = (kv_starts[:, None] + pos[None, :]).where(in_list, kv_starts[:, None]).reshape(-1)
    cells = indices.index_select(0, where)
    kc = k_flat.index_select(0, cells).view(n, max_len, D).to(torch.float32)
    vc = v_flat.index_select(0, cells).view(n, max_len, -1).to(torch.float32)
    s = torch.bmm(qs.view(n, Mq * g, D), kc.transpose(1, 2))  # [n, Mq * g, max_len]
    s4 = s.view(n, Mq, g, max_len)
    visible = pos[None, None, :] <= lim[:, :, None]  # [n, Mq, max_len]
    s4.masked_fill_(~visible[:, :, None, :], float("-inf"))
    # padding rows are all -inf (softmax gives NaN there): their output is discarded
    p = torch.softmax(s, dim=-1)
    return torch.bmm(p, vc).view(n, Mq, g, -1)


def paged_extend_attention_torch(
    q: Tensor,
    k_flat: Tensor,
    v_flat: Tensor,
    qo_indptr: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    sm_scale: float,
    *,
    key_chunk: int = 1024,
) -> Tensor:
    """Batched torch extend attention (see the module docstring). fp32 accumulation.

    ``q [nq_total, g, D]``, ``k_flat [C, D]``, ``v_flat [C, Dv]``; returns
    ``[nq_total, g, Dv]`` in ``q.dtype``.

    Pairs with queries are sorted by list length (descending) so that, for a key chunk
    starting at ``c0``, the pairs that still have keys are a prefix of the order; their
    queries are padded to the longest ``qo_len`` (``[n, Mq, g, D]``, pre-scaled by
    ``sm_scale``). Each key chunk (64, 64, 128, 256, 256, ... keys, at most ``key_chunk``) is
    gathered once (``index_select``) for those pairs; its query rows are processed in tiles
    (``bmm`` + online-softmax update, in place), restricted to the rows that can see a key of
    the chunk (the causal mask hides a chunk from the early queries of a pair whose new
    tokens come after it), and tiles every row of which sees the whole chunk skip the mask.
    Small problems run on one intra-op thread (:mod:`.threads`).
    """
    with cpu_threads_for(kv_indices.numel() * q.shape[-1] + q.numel(), q.device):
        layer = _TorchExtendLayer(qo_indptr, PairIndices(kv_indptr, kv_indices), q.shape[0], q.shape[1:],
                                  v_flat.shape[-1], key_chunk)
        return layer.run(q, k_flat, v_flat, sm_scale)


class _TorchExtendLayer:
    """The torch twin's plan of one layer: the checked lengths (one host read), the pairs with
    queries sorted by list length (descending), their query rows (padded to the longest
    ``qo_len``), last visible keys and the path (one shot or chunked)."""

    def __init__(self, qo_indptr: Tensor, pairs: PairIndices, nq_total: int, q_shape: tuple, dv: int,
                 key_chunk: int = 1024, lens: ExtendLengths | None = None):
        g, D = q_shape
        device = pairs.kv_indptr.device
        if lens is None:  # (ExtendPlan passes them, checked on the host copies)
            lens = extend_lengths(qo_indptr, pairs.kv_indptr, nq_total)
        self.nq_total, self.key_chunk = nq_total, max(1, int(key_chunk))
        active = [p for p, nq in enumerate(lens.qo_lens) if nq > 0]
        active.sort(key=lambda p: -lens.kv_lens[p])  # longest list first (stable: ties keep pair order)
        self.n = n = len(active)
        if not n:
            return
        self.kv_host = [lens.kv_lens[p] for p in active]
        self.nq_host = [lens.qo_lens[p] for p in active]
        self.off_host = [kv - nq for kv, nq in zip(self.kv_host, self.nq_host)]  # cells every query sees (>= 0)
        self.Mq, max_len = max(self.nq_host), self.kv_host[0]
        order, self.kv_lens, nq, offs, qo_starts = (to_device(torch.tensor(x, dtype=torch.long), device) for x in (
            active, self.kv_host, self.nq_host, self.off_host, [lens.qo_starts[p] for p in active]))
        self.kv_starts = pairs.kv_indptr.to(torch.long)[:-1].index_select(0, order)
        ar_q = torch.arange(self.Mq, device=device)
        q_valid = ar_q[None, :] < nq[:, None]  # [n, Mq]
        self.rows = (qo_starts[:, None] + ar_q[None, :]).where(q_valid, qo_starts[:, None])  # [n, Mq]
        self.lim = (offs[:, None] + ar_q[None, :]).where(q_valid, torch.full_like(self.rows, -1))  # last visible key
        # the padded rows that are real queries, and their rows of q: from the host lengths (a
        # boolean mask on the device would be read back to size its result)
        valid_host = (torch.arange(self.Mq)[None, :] < torch.tensor(self.nq_host)[:, None]).reshape(-1)
        rows_host = (torch.tensor([lens.qo_starts[p] for p in active])[:, None] + torch.arange(self.Mq)[None, :]).reshape(-1)
        self.valid_idx = to_device(torch.nonzero(valid_host).reshape(-1), device)
        self.dest = to_device(rows_host[valid_host], device)
        self.indices = pairs.kv_indices.to(torch.long)
        self.one_shot = n * self.Mq * g * max_len <= _SINGLE_SHOT_ELEMS and n * max_len * max(D, dv) <= _SINGLE_SHOT_KEY_ELEMS

    def run(self, q: Tensor, k_flat: Tensor, v_flat: Tensor, sm_scale: float) -> Tensor:
        nq_total, g, D = q.shape
        Dv = v_flat.shape[-1]
        out = torch.zeros((nq_total, g, Dv), dtype=q.dtype, device=q.device)
        if not self.n:
            return out
        n, Mq = self.n, self.Mq
        qs = q.index_select(0, self.rows.reshape(-1)).view(n, Mq, g, D).to(torch.float32)
        if sm_scale != 1.0:
            qs = qs * float(sm_scale)
        if self.one_shot:
            res = _one_shot(qs, k_flat, v_flat, self.indices, self.kv_starts, self.kv_lens, self.lim, self.kv_host[0])
        else:
            res = _chunked(qs, k_flat, v_flat, self.indices, self.kv_starts, self.kv_lens, self.lim, self.kv_host,
                           self.nq_host, self.off_host, self.key_chunk)
        out.index_copy_(0, self.dest, res.reshape(n * Mq, g, Dv).index_select(0, self.valid_idx).to(q.dtype))
        return out


def _chunked(qs, k_flat, v_flat, indices, kv_starts, kv_lens, lim, kv_host, nq_host, off_host, key_chunk):
    n, Mq, g, D = qs.shape
    Dv = v_flat.shape[-1]
    device = qs.device
    max_len = kv_host[0]
    # prefix maxima / minima over the (length-sorted) pairs: the active pairs of a chunk are a
    # prefix, so these give the query rows of the chunk on the host without a sync
    nq_pmax, off_pmax, off_pmin = [], [], []
    for x, o in zip(nq_host, off_host):
        nq_pmax.append(max(x, nq_pmax[-1] if nq_pmax else 0))
        off_pmax.append(max(o, off_pmax[-1] if off_pmax else 0))
        off_pmin.append(min(o, off_pmin[-1] if off_pmin else o))

    # running max starts at -1e30, not -inf: a row with no visible key so far gets p = 0
    # and, once it sees one, alpha = exp(-1e30 - m) = 0 (no NaN from -inf - -inf)
    m = torch.full((n, Mq * g), -1e30, dtype=torch.float32, device=device)
    l = torch.zeros((n, Mq * g), dtype=torch.float32, device=device)
    acc = torch.zeros((n, Mq * g, Dv), dtype=torch.float32, device=device)
    qflat = qs.view(n, Mq * g, D)
    ar = torch.arange(min(key_chunk, _MAX_CHUNK), device=device)
    n_act = n
    c0 = 0
    while c0 < max_len:
        chunk = min(key_chunk, _MAX_CHUNK, max(_MIN_CHUNK, c0))
        while n_act > 0 and kv_host[n_act - 1] <= c0:  # pairs with no key left
            n_act -= 1
        # only query rows [i_lo, i_hi) of the active pairs can see a key of this chunk: row i
        # of pair p sees keys <= off_p + i, so rows below c0 - max(off) see none of them
        i_lo = max(0, c0 - off_pmax[n_act - 1])
        i_hi = nq_pmax[n_act - 1]
        if i_lo >= i_hi:  # (cannot happen: the last query of an active pair sees its last key)
            c0 += chunk
            continue
        pos = c0 + ar[:chunk]
        in_list = pos[None, :] < kv_lens[:n_act, None]  # [n_act, chunk]
        # (index_select: much faster than advanced indexing on CPU)
        where = (kv_starts[:n_act, None] + pos[None, :]).where(in_list, kv_starts[:n_act, None]).reshape(-1)
        cells = indices.index_select(0, where)
        kc = k_flat.index_select(0, cells).view(n_act, chunk, D).to(torch.float32).transpose(1, 2)
        vc = v_flat.index_select(0, cells).view(n_act, chunk, Dv).to(torch.float32)
        # query rows in tiles of about _TILE_ELEMS scores: the elementwise softmax work then
        # runs in cache instead of streaming a [n_act, rows, chunk] array through memory
        rb = max(1, _TILE_ELEMS // (n_act * g * chunk))
        for a in range(i_lo, i_hi, rb):
            b = min(a + rb, i_hi)
            r0, r1 = a * g, b * g
            s = torch.bmm(qflat[:n_act, r0:r1], kc)  # [n_act, (b - a) * g, chunk]
            # A tile every query row sees entirely (before the first new token of every
            # active pair) needs no mask; padding rows then see real keys (finite, discarded).
            if c0 + chunk - 1 > off_pmin[n_act - 1] + a:
                hidden = pos[None, None, :] > lim[:n_act, a:b, None]  # [n_act, b - a, chunk]
                s.view(n_act, b - a, g, chunk).masked_fill_(hidden[:, :, None, :], float("-inf"))
            m_old = m[:n_act, r0:r1]
            m_new = torch.maximum(m_old, s.amax(dim=-1))
            alpha = torch.exp(m_old - m_new)
            p = s.sub_(m_new[..., None]).exp_()  # in place: s is not needed any more
            l[:n_act, r0:r1].mul_(alpha).add_(p.sum(dim=-1))
            acc[:n_act, r0:r1].mul_(alpha[..., None]).baddbmm_(p, vc)
            m_old.copy_(m_new)
        c0 += chunk
    # padding rows have l = 0 (their output is discarded)
    res = acc.div_(l.clamp_min_(torch.finfo(torch.float32).tiny)[..., None])
    return res.view(n, Mq, g, Dv)


def paged_extend_attention(
    q: Tensor,
    k_flat: Tensor,
    v_flat: Tensor,
    qo_indptr: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    sm_scale: float,
    impl: str = "auto",
) -> Tensor:
    """Extend attention of every pair's query rows over its list of cells (causal, aligned to
    the end of the list).

    ``q [nq_total, g, D]``; ``k_flat [C, D]`` / ``v_flat [C, Dv]`` (flat single-head views of
    one layer); ``qo_indptr`` / ``kv_indptr [n_pairs + 1]`` (int32/int64); ``kv_indices [nnz]``
    cell ids (int32/int64). Returns ``[nq_total, g, Dv]`` in ``q.dtype``.
    ``impl``: ``"auto" | "torch" | "triton" | "flashinfer"`` (see :mod:`.dispatch`).
    The per-pair lengths (``kv_len >= qo_len``) are checked by every implementation (one
    host read of the two indptrs).
    """
    if q.dim() != 3 or k_flat.dim() != 2 or v_flat.dim() != 2:
        raise ValueError(
            f"q must be [nq_total, g, D] and k/v [C, D] / [C, Dv]; got {tuple(q.shape)}, {tuple(k_flat.shape)}, {tuple(v_flat.shape)}"
        )
    if k_flat.shape[1] != q.shape[2]:
        raise ValueError(f"head dim mismatch: q has D = {q.shape[2]}, k_flat has {k_flat.shape[1]}")
    if k_flat.shape[0] != v_flat.shape[0]:
        raise ValueError(f"k_flat has {k_flat.shape[0]} cells but v_flat has {v_flat.shape[0]}")
    if qo_indptr.dim() != 1 or kv_indptr.dim() != 1 or kv_indices.dim() != 1:
        raise ValueError("qo_indptr, kv_indptr and kv_indices must be 1-D")
    if qo_indptr.numel() != kv_indptr.numel():
        raise ValueError(f"qo_indptr has {qo_indptr.numel()} entries but kv_indptr has {kv_indptr.numel()} (both n_pairs + 1)")
    for name, t in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    plan = ExtendPlan(qo_indptr, q.shape[0], q.device, (q.shape[1], q.shape[2], v_flat.shape[-1]), k_flat.dtype, impl)
    return plan.plan({0: PairIndices(kv_indptr, kv_indices)}).run(0, q, k_flat, v_flat, sm_scale)


class ExtendPlan:
    """Extend attention planned once per forward and run per layer (FlashInfer's
    ``BatchPrefillWithPagedKVCacheWrapper`` split). The queries' CSR (``qo_indptr``) is the
    forward's; :meth:`plan` takes the key lists of one or more layers (``{layer: PairIndices}``)
    and checks every pair's lengths (``kv_len >= qo_len``) on the host once per layer.

    * torch: per layer the sorted pairs, padded query rows, last visible keys and the path;
      ``run`` gathers and computes (small work on one CPU thread, :mod:`.threads`);
    * triton: the checked longest ``qo_len``; ``run`` launches the kernel without a host read;
    * flashinfer: the lists and their host indptrs: each layer has its own lists and a
      FlashInfer plan serves one set, so ``run`` plans its layer's wrapper, then runs it.

    ``qo_indptr_host`` and ``plan``'s ``host_indptr`` (``{layer: kv_indptr on the host}``):
    host copies from the index builder, which knows every length there; with them nothing
    is read back from the GPU, without them each indptr is read once.
    """

    def __init__(self, qo_indptr: Tensor, nq_total: int, device, shape: tuple, kv_dtype: torch.dtype | None = None,
                 impl: str = "auto", qo_indptr_host: Tensor | None = None):
        self.qo_indptr, self.nq_total, self.device = qo_indptr, int(nq_total), torch.device(device)
        self.qo_indptr_host = qo_indptr_host
        self.g, self.head_dim, self.head_dim_v = (int(x) for x in shape)  # (g, D, Dv)
        self.impl = resolve_impl("extend", self.device, impl, dtype=kv_dtype)
        self.layers: dict = {}

    @property
    def index_dtype(self) -> torch.dtype:
        """The cell-id dtype the lists should be built in: int32 for FlashInfer, int64 otherwise."""
        return torch.int32 if self.impl == "flashinfer" else torch.int64

    def plan(self, layers: dict, host_indptr: dict | None = None) -> "ExtendPlan":
        host_indptr = host_indptr or {}
        with cpu_threads_for(0, self.device):
            for l, pairs in layers.items():
                if l in self.layers:
                    continue
                if self.qo_indptr_host is None:
                    self.qo_indptr_host = self.qo_indptr.to("cpu")  # read once per forward
                kv_host = host_indptr.get(l)
                if kv_host is None:
                    kv_host = pairs.kv_indptr.to("cpu")
                lens = extend_lengths(self.qo_indptr_host, kv_host, self.nq_total)  # checked on the host
                if self.impl == "torch":
                    self.layers[l] = _TorchExtendLayer(self.qo_indptr, pairs, self.nq_total, (self.g, self.head_dim),
                                                       self.head_dim_v, lens=lens)
                else:
                    self.layers[l] = (pairs, lens.max_qo, kv_host)
        return self

    def run(self, layer: int, q: Tensor, k_flat: Tensor, v_flat: Tensor, sm_scale: float) -> Tensor:
        """``q [nq_total, g, D]`` -> ``[nq_total, g, Dv]`` over layer ``layer``'s planned lists."""
        planned = self.layers[layer]
        if self.impl == "torch":
            with cpu_threads_for(planned.indices.numel() * q.shape[-1] + q.numel() if planned.n else 0, q.device):
                return planned.run(q, k_flat, v_flat, sm_scale)
        pairs, max_qo, kv_host = planned
        if self.impl == "triton":
            from ._triton_extend import paged_extend_attention_triton

            return paged_extend_attention_triton(q, k_flat, v_flat, self.qo_indptr, pairs.kv_indptr, pairs.kv_indices,
                                                 sm_scale, max_qo_len=max_qo, check=False)
        from .flashinfer_extend import paged_extend_attention_flashinfer

        return paged_extend_attention_flashinfer(q, k_flat, v_flat, self.qo_indptr, pairs.kv_indptr, pairs.kv_indices,
                                                 sm_scale, layer=layer, qo_indptr_host=self.qo_indptr_host,
                                                 kv_indptr_host=kv_host, checked=True)
