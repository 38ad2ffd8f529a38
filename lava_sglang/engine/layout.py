"""Queries over a compressed layout: the one path for decode, for extend forwards of a
conversation that continues over its compressed cache, and for the retraction replay.

What a request's row of ``req_to_token`` holds, as this module reads it (``docs/design.md``, "Memory layout" and "Decode index"):

* ``row[0:P]``: the prefix, read by every KV head (the tree-shared prefix of a compressed
  request; the whole sequence of an uncompressed one, with ``P = L = S``);
* ``mid(l)``: the kept cells of layer ``l``, per KV head (absolute cell ids of the pool's
  flat single-head view over all layers, ``engine.cells``: they may sit in any layer's part of
  the slots the request owns; head-major, with their per-head counts);
* ``row[L:S]``: the tokens appended after compression (decode tokens, a later turn's new
  tokens), read by every head; the forward's ``n_q`` queries are the last ``n_q`` of them.

Prefix and appended tokens are read where SGLang wrote them: cell ``base[l] + slot * Hkv + h``.

One :class:`LayoutEntry` per request (or per segment of a request's queries) in a forward.
In layer ``l``, KV head ``h`` its queries attend to ``row[0:P]``, ``mid(l)[h]`` and
``row[L:S]``, causally (query ``i`` of ``n_q`` sees all but the last ``n_q - 1 - i`` cells).
:class:`LayoutPlan` gathers the row ranges of a batch once and builds each layer's CSR cell
lists with :func:`lava_sglang.kernels.pair_indices.build_pair_indices` (the one index
builder); :func:`attend` runs the decode kernel when every entry has one query, the extend
kernel otherwise (batched torch on CPU, Triton / FlashInfer on CUDA: see ``kernels/``),
planned once per forward (:class:`~lava_sglang.kernels.decode_attention.DecodePlan`,
:class:`~lava_sglang.kernels.extend_attention.ExtendPlan`: every layer's lists at once when
they were built together) and run per layer.

No SGLang import: ``layer`` is anything with ``layer_id``, ``tp_q_head_num``,
``tp_k_head_num``, ``qk_head_dim``, ``v_head_dim`` and ``scaling`` (SGLang's RadixAttention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lava_sglang.engine.cells import CellSpace
from lava_sglang.kernels.decode_attention import DecodePlan
from lava_sglang.kernels.extend_attention import ExtendPlan
from lava_sglang.kernels.pair_indices import (PairIndices, append_pair_cells, build_pair_indices, gather_row_ranges,
                                               to_device)
from lava_sglang.kernels.threads import cpu_threads_for

# layer id -> (cells [sum(lens)] int64 head-major, lens [Hkv] int64), or None: no kept cells
MidFn = Callable[[int], Optional[tuple]]


@dataclass
class LayoutEntry:
    row: int  # req_to_token row
    prefix_end: int  # P
    suffix_start: int  # L
    seq_end: int  # S: one past the last cell read (the last query's own token)
    n_q: int  # queries of this entry: the tokens row[S - n_q:S]
    q_offset: int  # index of its first query in the forward's flattened tokens
    mid: Optional[MidFn] = None

    def __post_init__(self):
        P, L, S, n = self.prefix_end, self.suffix_start, self.seq_end, self.n_q
        if not (0 <= P <= L <= S) or n < 1 or S - n < (L if self.mid is not None else 0):
            raise ValueError(f"row {self.row}: inconsistent layout P={P} L={L} S={S} n_q={n}")


def uncompressed_entry(row: int, seq_end: int, n_q: int, q_offset: int) -> LayoutEntry:
    return LayoutEntry(row, seq_end, seq_end, seq_end, n_q, q_offset)


def state_mid(state) -> MidFn:
    """The kept cells of a :class:`~lava_sglang.engine.state.CompressedRequest`. Its ``key``
    (the state's cell lists, replaced whenever compression, re-selection or a rewind changes
    them) lets a plan reuse the gathered cells of the previous decode step."""
    def mid(layer):
        return state.mid_cells[layer], state.mid_lens[layer]
    mid.key = (state.mid_cells, state.mid_lens)
    return mid


def positions_mid(keep: list, row_slots: torch.Tensor, space: CellSpace) -> MidFn:
    """Kept cells given as row positions (``keep[l][h]``) of a row whose slots are ``row_slots``
    (not repacked yet: the retraction replay)."""
    def mid(layer):
        heads = keep[layer]
        cells = torch.cat([space.cells(layer, row_slots[to_device(heads[h], row_slots.device)], h)
                           for h in range(len(heads))])
        return cells, torch.tensor([int(t.numel()) for t in heads], dtype=torch.long)
    return mid


class LayoutPlan:
    """Cell lists of one forward's entries: row ranges gathered once, per-layer CSR on demand."""

    def __init__(self, entries: list, req_to_token: torch.Tensor, space: CellSpace):
        self.entries = entries
        self.space = space
        self.req_to_token = req_to_token
        self.n_kv_heads = H = space.n_kv_heads
        device = req_to_token.device
        self._ranges = None  # (prefix slots, prefix lens, suffix slots, suffix lens): gathered when built
        n_q = [e.n_q for e in entries]
        self.decode_only = all(n == 1 for n in n_q) and [e.q_offset for e in entries] == list(range(len(entries)))
        self._layers: dict = {}  # layer -> PairIndices
        self._host: dict = {}  # layer -> its kv_indptr on the host (int32)
        self._kept = None  # (kept cells of every layer, counts [n_layers, R, H] on the host): kept_pieces
        self._pair_lens = None  # [n_layers, R, H] on the host (pair_lens)
        self._kernel = None  # the forward's DecodePlan / ExtendPlan (kernel_plan)
        self._index_dtype = torch.int64  # cell ids; int32 for FlashInfer (its kernel plan's index_dtype)
        self._per_layer = None  # decided by the first indices(): built (or appended) layer by layer
        self._prev = None  # layer-by-layer append: (previous {layer: lists}, {layer: host indptr}, this step's slots)
        if self.decode_only:  # the decode kernel reads q as it is: no query index (hot path: every decode step)
            self.n_tokens = len(entries)
            return
        # pair-major query rows: pair (e, h) reads tokens q_offset(e) .. + n_q(e) - 1 of head group h
        pair_q = torch.tensor([n for n in n_q for _ in range(H)], dtype=torch.long)
        self.qo_indptr = torch.zeros(len(entries) * H + 1, dtype=torch.int32)
        torch.cumsum(pair_q, 0, out=self.qo_indptr[1:])
        self.qo_indptr_host = self.qo_indptr
        self.qo_indptr = to_device(self.qo_indptr, device)
        tokens, pair_rows, base = [], [], 0
        head = torch.arange(H)
        for e in entries:
            tokens.append(torch.arange(e.q_offset, e.q_offset + e.n_q))
            pair_rows.append(((base + torch.arange(e.n_q))[None, :] * H + head[:, None]).reshape(-1))
            base += e.n_q
        self.n_tokens = base
        self.token_rows = to_device(torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long), device)
        self.pair_rows = to_device(torch.cat(pair_rows) if pair_rows else torch.zeros(0, dtype=torch.long), device)

    def kernel_plan(self, layer_id: int, shape: tuple, kv_dtype):
        """The forward's kernel plan (``shape``: ``(g, D, Dv)``) with layer ``layer_id`` planned:
        every layer built so far is planned with it (all of them after an all-layer build),
        from the host copies of their indptrs (no host sync)."""
        if self._kernel is None:
            device = self.req_to_token.device
            self._kernel = (DecodePlan(device, shape[1], kv_dtype) if self.decode_only else
                            ExtendPlan(self.qo_indptr, self.n_tokens * self.n_kv_heads, device, shape, kv_dtype,
                                       qo_indptr_host=self.qo_indptr_host))
            self._index_dtype = self._kernel.index_dtype
        if layer_id not in self._kernel.layers:
            self.indices(layer_id)
            self._kernel.plan(dict(self._layers), host_indptr=self._host)
        return self._kernel

    def ranges(self):
        """The entries' prefix ``row[0:P]`` and appended ``row[L:S]`` slots, gathered once."""
        if self._ranges is None:
            rows = [e.row for e in self.entries]
            zeros = [0] * len(self.entries)
            self._ranges = (*gather_row_ranges(self.req_to_token, rows, zeros, [e.prefix_end for e in self.entries]),
                            *gather_row_ranges(self.req_to_token, rows, [e.suffix_start for e in self.entries],
                                               [e.seq_end for e in self.entries]))
        return self._ranges

    def pair_lens(self) -> torch.Tensor:
        """Every list's length, ``[n_layers, R, H]`` on the host: ``P``, the kept cells of the
        (layer, head) and ``S - L`` are all known there, so no index build reads one back."""
        if self._pair_lens is None:
            if self._kept is None:
                self._kept = kept_pieces(self.entries, self.space.n_layers, self.n_kv_heads, self.req_to_token.device)
            pre = torch.tensor([e.prefix_end for e in self.entries], dtype=torch.long)
            suf = torch.tensor([max(0, e.seq_end - e.suffix_start) for e in self.entries], dtype=torch.long)
            self._pair_lens = self._kept[1] + (pre + suf)[None, :, None]
        return self._pair_lens

    def indices(self, layer_id: int):
        """Layer ``layer_id``'s CSR (and its indptr on the host, ``self._host``). The first call
        builds every layer's at once (one vectorized build, one "request" per (layer,
        request); prefix and appended cells differ between layers only by the layer's cell
        base) unless that would hold more than ``ALL_LAYERS_MAX`` indices; then each layer is
        built when asked for. A decode step of the batch the previous decode plan served, each
        request one token further, appends its new token's cells to that plan's lists instead
        (``_DECODE_CSR``; all layers at once, or layer by layer). No host sync: every length is
        known on the host (:meth:`pair_lens`)."""
        built = self._layers.get(layer_id)
        if built is not None:
            return built
        if self._per_layer is None and self.decode_only and self._append_step() and layer_id in self._layers:
            return self._layers[layer_id]
        if self._prev is not None and layer_id in self._prev[0]:
            return self._append_layer(layer_id)
        R, H, n_layers = len(self.entries), self.n_kv_heads, self.space.n_layers
        lens = self.pair_lens()
        mid, mid_lens = self._kept
        prefix_slots, prefix_lens, suffix_slots, suffix_lens = self.ranges()
        total = int(lens.sum())  # (host tensors)
        if self._per_layer is None:
            self._per_layer = R == 0 or total > ALL_LAYERS_MAX
            if self._per_layer:  # the next decode step appends layer by layer
                key = self._step_key() if self.decode_only else None
                _DECODE_CSR[:] = [key, tuple(e.seq_end for e in self.entries), None, self._layers,
                                  self._host] if key is not None else []
        if self._per_layer:
            lo = int(mid_lens[:layer_id].sum())
            host = _host_indptr(lens[layer_id].reshape(-1))
            built = build_pair_indices(H, prefix_slots, prefix_lens, suffix_slots, suffix_lens,
                                       mid[lo:lo + int(mid_lens[layer_id].sum())], mid_lens[layer_id],
                                       index_dtype=self._index_dtype, cell_base=self.space.base[layer_id],
                                       nnz=int(host[-1]))
            self._layers[layer_id], self._host[layer_id] = built, host
            return built
        device = self.req_to_token.device
        big = build_pair_indices(H, prefix_slots.repeat(n_layers), prefix_lens.repeat(n_layers),
                                 suffix_slots.repeat(n_layers), suffix_lens.repeat(n_layers), mid,
                                 mid_lens.reshape(n_layers * R, H), index_dtype=self._index_dtype,
                                 cell_base=self.space.base_t.to(device).repeat_interleave(R), nnz=total)
        self._split(big, _host_indptr(lens.reshape(-1)), self._step_key() if self.decode_only else None)
        return self._layers[layer_id]

    def _split(self, big: PairIndices, big_host: torch.Tensor, key) -> None:
        n = len(self.entries) * self.n_kv_heads
        bounds = big_host[::n].tolist()  # each layer's first index (a host tensor)
        for l in range(self.space.n_layers):
            self._layers[l] = PairIndices(big.kv_indptr[l * n:(l + 1) * n + 1] - bounds[l],
                                          big.kv_indices[bounds[l]:bounds[l + 1]])
            self._host[l] = big_host[l * n:(l + 1) * n + 1] - bounds[l]
        _DECODE_CSR[:] = [key, tuple(e.seq_end for e in self.entries), big, big_host] if key is not None else []

    def _step_key(self):
        return (self.space, self.req_to_token, tuple(e.row for e in self.entries),
                tuple(getattr(e.mid, "key", None) if e.mid is not None else () for e in self.entries),
                self._index_dtype)

    def _append_step(self) -> bool:
        """The previous decode plan's lists plus this step's token (see :meth:`indices`): all
        layers at once after an all-layer build, else each layer when asked for."""
        if not _DECODE_CSR:
            return False
        key, ends, big, host = _DECODE_CSR[:4]
        now = self._step_key()
        if any(k is None for k in now[3]) or len(key[2]) != len(now[2]) or key[0] is not now[0] or key[1] is not now[1]:
            return False
        if key[2] != now[2] or key[4] != now[4] or any(
                len(a) != len(b) or any(x is not y for x, y in zip(a, b)) for a, b in zip(key[3], now[3])):
            return False
        if any(e.seq_end != s + 1 for e, s in zip(self.entries, ends)):
            return False
        R, H = len(self.entries), self.n_kv_heads
        n = self.space.n_layers * R * H
        if big is not None and int(host[-1]) + n > ALL_LAYERS_MAX:
            return False  # grown past the all-layer bound: built afresh, layer by layer
        device = self.req_to_token.device
        rows = to_device(torch.tensor([e.row for e in self.entries], dtype=torch.long), device)
        last = to_device(torch.tensor([e.seq_end - 1 for e in self.entries], dtype=torch.long), device)
        slots = self.req_to_token[rows, last].to(torch.long)  # [R]: this step's tokens
        self._per_layer = big is None
        if big is None:  # layer by layer (indices -> _append_layer)
            self._prev = (dict(_DECODE_CSR[3]), dict(_DECODE_CSR[4]), slots)  # (the previous plan is left as it is)
            _DECODE_CSR[:] = [now, tuple(e.seq_end for e in self.entries), None, self._layers, self._host]
            return True
        head = torch.arange(H, device=device)
        cells = (self.space.base_t.to(device)[:, None, None] + slots[None, :, None] * H + head[None, None, :]).reshape(-1)
        self._split(append_pair_cells(big, cells), host + torch.arange(n + 1, dtype=host.dtype), now)
        return True

    def _append_layer(self, layer_id: int) -> PairIndices:
        """Layer ``layer_id``'s lists of the previous decode step plus this step's token (the
        reference to the previous step's lists is dropped as they are replaced: once the
        previous plan is gone, memory stays about one step's)."""
        layers, hosts, slots = self._prev
        H = self.n_kv_heads
        head = torch.arange(H, device=slots.device)
        cells = (self.space.base[layer_id] + slots[:, None] * H + head[None, :]).reshape(-1)
        host = hosts.pop(layer_id)
        self._layers[layer_id] = append_pair_cells(layers.pop(layer_id), cells)
        self._host[layer_id] = host + torch.arange(host.numel(), dtype=host.dtype)
        return self._layers[layer_id]


def _host_indptr(lens: torch.Tensor) -> torch.Tensor:
    """The int32 CSR offsets of host lengths (on the host)."""
    indptr = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    torch.cumsum(lens, 0, out=indptr[1:])
    return indptr


# Above this many indices for all layers together, a plan builds each layer's lists on its own,
# and the next decode steps append to each layer's lists on its own (``_append_layer``). The
# bound is on the transient of the one vectorized build (a few int64 tensors of that size, GPU
# memory outside the KV pool on CUDA). Rather than raising it on CUDA, the per-layer way got an
# append path: both ways cost no host sync (every length is known on the host) and append
# instead of rebuilding on later decode steps, so above the bound a step costs ~6 small index
# ops per layer instead of ~6 in all, nothing that waits for the GPU.
ALL_LAYERS_MAX = 1 << 22
# The kept cells of the last batch of keyed entries: (keys, rows, mid cells, lens).
_KEPT_CACHE: list = []
# The last decode plan's lists: (batch key, seq ends, all-layer PairIndices and its host indptr),
# or (batch key, seq ends, None, {layer: PairIndices}, {layer: host indptr}) when built per layer.
_DECODE_CSR: list = []


def forget_decode_steps() -> None:
    """Called before every extend forward: a row can change hands only through a prefill, so the
    next decode plan never appends to lists of another request's row."""
    _DECODE_CSR.clear()


def kept_pieces(entries: list, n_layers: int, H: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's kept cells of ``entries``, layer-major then entry-major then head-major, and
    their counts ``[n_layers, R, H]`` (on the host: ``CompressedRequest.mid_lens`` is a host
    tensor). A decode batch of the same requests over unchanged states (the usual next step)
    gets the previous step's tensors back: no per-layer Python work."""
    keys = tuple(getattr(e.mid, "key", None) if e.mid is not None else () for e in entries)
    rows = tuple(e.row for e in entries)
    if all(k is not None for k in keys) and _KEPT_CACHE:
        old_keys, old_rows, mid, lens = _KEPT_CACHE
        if old_rows == rows and len(old_keys) == len(keys) and all(
                len(a) == len(b) and all(x is y for x, y in zip(a, b)) for a, b in zip(old_keys, keys)):
            return mid, lens
    pieces, lens = [], torch.zeros((n_layers, len(entries), H), dtype=torch.long)
    for l in range(n_layers):
        for r, e in enumerate(entries):
            got = e.mid(l) if e.mid is not None else None
            if got is not None:
                pieces.append(got[0])
                lens[l, r] = torch.as_tensor(got[1], dtype=torch.long).cpu()
    mid = torch.cat(pieces).to(device) if pieces else torch.zeros(0, dtype=torch.long, device=device)
    _KEPT_CACHE.clear()
    if all(k is not None for k in keys):
        _KEPT_CACHE.extend((keys, rows, mid, lens))
    return mid, lens


def save_kv(layer, k, v, out_cache_loc, pool) -> None:
    """Write this forward's keys and values (what the attention backend would have done)."""
    if k is None or v is None:
        return
    Hkv, D = layer.tp_k_head_num, layer.qk_head_dim
    pool.set_kv_buffer(layer, out_cache_loc, k.view(-1, Hkv, D), v.view(-1, Hkv, layer.v_head_dim))


def attend(layer, q: torch.Tensor, plan: LayoutPlan, pool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of the plan's queries over their layouts, written into ``out``'s rows
    (``[T, Hq * Dv]``; a new tensor of ``T = plan.n_tokens`` rows when None). On CPU the index
    work and a small layer's attention run on one intra-op thread (``kernels.threads``: with
    busy cores each of their ~20 small parallel ops per layer would wait for a descheduled
    worker, seconds per decode step; issue 25, case 5)."""
    Hq, Hkv, D, Dv = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
    g = Hq // Hkv
    k_flat = plan.space.k_flat
    with cpu_threads_for(0, q.device):  # index building and planning: small integer ops
        kernel = plan.kernel_plan(layer.layer_id, (g, D, Dv), k_flat.dtype)
        work = plan.indices(layer.layer_id).kv_indices.numel() * D + q.numel()
    with cpu_threads_for(work, q.device):
        return _attend(layer, q, plan, kernel, out)


def _attend(layer, q, plan, kernel, out):
    Hq, Hkv, D, Dv = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
    g = Hq // Hkv
    k_flat, v_flat = plan.space.k_flat, plan.space.v_flat
    q3 = q.reshape(-1, Hq, D)
    if out is None:
        out = q.new_empty((q3.shape[0], Hq * Dv))
    o3 = out.view(-1, Hq, Dv)
    if plan.decode_only:
        B = len(plan.entries)
        res = kernel.run(layer.layer_id, q3[:B].reshape(B * Hkv, g, D), k_flat, v_flat, layer.scaling)
        o3[:B] = res.reshape(B, Hq, Dv)
        return out
    n = plan.n_tokens
    q_pairs = q3.index_select(0, plan.token_rows).reshape(n * Hkv, g, D).index_select(0, plan.pair_rows)
    res = kernel.run(layer.layer_id, q_pairs, k_flat, v_flat, layer.scaling)
    tok = torch.empty((n * Hkv, g, Dv), dtype=res.dtype, device=res.device)
    tok[plan.pair_rows] = res
    o3[plan.token_rows] = tok.view(n, Hq, Dv).to(out.dtype)
    return out
