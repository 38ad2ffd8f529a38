"""Compress one prefilled request inside SGLang's KV pool: score, select, repack, free.

Reads each layer's keys and values of the request from the pool (one layer at a time),
scores them with the configured policy against the captured window queries, selects what
each (layer, KV head) keeps, packs the kept vectors of every layer into the request's first
``K`` private slots (exact packing across layers, ``engine.cells``) and returns the rest of
the private slots to the allocator at once.

``select_and_pack`` is the one selection path: a first compression (candidates: the private
range of the prompt) and the re-selection of a continued turn (candidates per (layer, head):
the cells kept so far, then the turn's appended tokens; ``engine.continuation``) both hand it
their candidates and scores; it selects (``Policy.select``), packs and frees.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

import torch

from lava_sglang.engine.cells import CellSpace, pool_cells
from lava_sglang.engine.state import CompressedRequest, PendingRequest
from lava_sglang.kernels.repack import repack_cells
from lava_sglang.policies import get_policy


class Candidates(NamedTuple):
    """What one (layer, KV head) may keep: ``cells`` (cell ids in the flat view) at row
    ``positions``; the first ``n_scored`` are scored, the rest are the observation window."""

    cells: torch.Tensor
    positions: torch.Tensor
    n_scored: int


class Packed(NamedTuple):
    keep: list  # per layer, per head: kept row positions
    kept_slots: int
    mid_cells: list  # per layer: packed cell ids (head-major)
    lens: list  # per layer, per head: kept cells
    slots_freed: int
    chosen: list  # per layer, per head: indexes into its candidates


def chosen_from_selection(keep: list, candidates: list, prefix_len: int, n_max: int) -> list:
    """Map a selection over the padded score space ``[P, P + n_max + w)`` to candidate indexes:
    a head's scored candidates are positions ``P .. P + n_scored``, its window ``P + n_max ..``;
    positions in a head's padding are dropped."""
    out = []
    for layer, heads in enumerate(keep):
        row = []
        for h, pos in enumerate(heads):
            n_h = candidates[layer][h].n_scored
            idx = pos.to(torch.long).cpu() - prefix_len
            row.append(torch.cat([idx[idx < n_h], idx[idx >= n_max] - n_max + n_h]))
        out.append(row)
    return out


def select_and_pack(cfg, candidates: list, scores: Optional[list], prefix_len: int, owned_slots: torch.Tensor,
                    req_to_token: torch.Tensor, row: int, space: CellSpace, allocator, end: int,
                    chosen: Optional[list] = None, require_gain: bool = False) -> Optional[Packed]:
    """Select what every (layer, KV head) keeps among its ``candidates`` and pack it into the row.

    ``scores[l]``: ``[Hkv, n_max]`` fp32, head ``h``'s scores of its first ``n_scored``
    candidates, zero-padded to the longest head. ``chosen``: the candidate indexes to keep
    instead of selecting (a replay after a retraction). None when the policy keeps everything,
    or (``require_gain``) when packing would not free a slot."""
    if chosen is None:
        n_max = int(scores[0].shape[1])
        sel = get_policy(cfg.policy).select(cfg, scores, prefix_len, prefix_len + n_max + cfg.window)
        if not sel.compressed:
            return None
        chosen = chosen_from_selection(sel.keep, candidates, prefix_len, n_max)
    keep, sources, lens = [], [], []
    for layer, heads in enumerate(candidates):
        keep.append([c.positions[idx] for c, idx in zip(heads, chosen[layer])])
        sources.append(torch.cat([c.cells[idx.to(c.cells.device)] for c, idx in zip(heads, chosen[layer])]))
        lens.append([int(idx.numel()) for idx in chosen[layer]])
    if require_gain and space.slots_for(sum(sum(row_lens) for row_lens in lens)) >= owned_slots.numel():
        return None
    kept_slots, mid_cells, freed = pack_and_free(sources, owned_slots, req_to_token, row, prefix_len, space,
                                                 allocator, end)
    return Packed(keep, kept_slots, mid_cells, lens, freed, chosen)


def score_prompt(pending: PendingRequest, row_slots: torch.Tensor, kv_pool) -> list:
    """Every layer's scores of the private range against the captured window queries."""
    cfg, P = pending.config, pending.prefix_len
    policy = get_policy(cfg.policy)
    scores = []
    for layer in range(len(pending.queries)):
        k_buf, v_buf = kv_pool.get_key_buffer(layer), kv_pool.get_value_buffer(layer)
        keys, values = k_buf[row_slots], v_buf[row_slots]
        scores.append(policy.score_layer(cfg, pending.queries[layer], keys, values, P))
    return scores


def pack_and_free(sources: list, owned_slots: torch.Tensor, req_to_token: torch.Tensor, row: int, prefix_len: int,
                  space: CellSpace, allocator, end: int) -> tuple[int, list, int]:
    """Pack every layer's kept cells into the first ``K`` of ``owned_slots`` and free the rest.

    ``sources[l]``: the cell ids (head-major, as the layout reads them) layer ``l`` keeps, all
    inside the cells of ``owned_slots`` (any layer's). Exact packing (``engine.cells``): the
    cells of all layers fill ``K = ceil(sum_l len(sources[l]) / (n_layers * Hkv))`` slots, every
    layer's part of each; a layer with more than its share of cells spills into the other
    layers' parts. Afterwards the row reads ``row[P:P+K] = owned_slots[:K]`` and
    ``row[P+K:end] = 0``; ``owned_slots[K:]`` went back to the allocator. Every kept vector is
    gathered before any is written (one ``repack_cells`` over all layers), so a target cell that
    is another layer's source is read first.
    Returns ``(K, packed cell ids per layer, slots freed)``.
    """
    counts = [int(src.numel()) for src in sources]
    kept_slots = space.slots_for(sum(counts))
    target_slots = owned_slots[:kept_slots]
    dst = space.packed(target_slots, sum(counts))
    if dst.numel():
        repack_cells(space.k_flat, space.v_flat, torch.cat(sources).to(dst.device), dst)
    mid_cells = list(torch.split(dst, counts))
    freed = owned_slots[kept_slots:].clone()
    req_to_token[row, prefix_len:prefix_len + kept_slots] = target_slots.to(req_to_token.dtype)
    req_to_token[row, prefix_len + kept_slots:end] = 0
    if freed.numel():
        allocator.free(freed)
    return kept_slots, mid_cells, int(freed.numel())


def make_report(cfg, keep: list, private_tokens: int, prompt_tokens: int, prefix_len: int, kept_slots: int,
                slots_freed: int, seconds: float, prefill_seconds: float, n_kv_heads: int) -> dict:
    """What ``meta_info["kv_compression"]`` shows for one compression (or re-selection)."""
    n_layers = len(keep)
    cells_per_layer = [sum(int(t.numel()) for t in heads) for heads in keep]
    kept_cells = sum(cells_per_layer)
    return {
        "policy": cfg.policy,
        "budget": cfg.budget,
        "prompt_tokens": prompt_tokens,
        "shared_prefix_tokens": prefix_len,
        "private_tokens": private_tokens,
        "kept_cells": kept_cells,
        "private_cells": private_tokens * n_kv_heads * n_layers,
        "slots_held": prefix_len + kept_slots,
        "private_slots": kept_slots,
        "slots_freed": slots_freed,
        "packing_efficiency": round(kept_cells / max(1, kept_slots * n_kv_heads * n_layers), 4),
        "layer_budget_max_over_mean": round(max(cells_per_layer) / max(1e-9, sum(cells_per_layer) / n_layers), 4),
        "compression_ms": round(seconds * 1000, 2),
        "prefill_ms": round(prefill_seconds * 1000, 2),
    }


def compress_request(pending: PendingRequest, req_to_token: torch.Tensor, kv_pool, allocator,
                     prefill_seconds: float = 0.0) -> Optional[CompressedRequest]:
    """Compress ``pending`` in place; None when the policy keeps everything (nothing to do).

    A re-prefill after a retraction (``pending.replay``) applies the selection it had before
    instead of scoring again: the prompt's keys and queries are the same (causal attention), so
    scoring would choose the same cells, and replaying keeps the outcome exact by construction.
    """
    started = time.perf_counter()
    cfg, row, P, L = pending.config, pending.row, pending.prefix_len, pending.prompt_len
    row_slots = req_to_token[row, :L].to(torch.long)
    space = pool_cells(kv_pool)
    n_kv_heads = space.n_kv_heads
    private = row_slots[P:L]
    positions = torch.arange(P, L, dtype=torch.long)
    n_scored = L - P - cfg.window
    candidates = [[Candidates(space.cells(layer, private, h), positions, n_scored) for h in range(n_kv_heads)]
                  for layer in range(len(pending.replay.keep) if pending.replay is not None else len(pending.queries))]
    if pending.replay is not None:
        chosen = [[(pos.to(torch.long).cpu() - P) for pos in heads] for heads in pending.replay.keep]
        packed = select_and_pack(cfg, candidates, None, P, private, req_to_token, row, space, allocator, L,
                                 chosen=chosen, require_gain=True)
    else:
        packed = select_and_pack(cfg, candidates, score_prompt(pending, row_slots, kv_pool), P, private, req_to_token,
                                 row, space, allocator, L, require_gain=True)
    if packed is None:
        return None
    keep, kept_slots, mid_cells, freed = packed.keep, packed.kept_slots, packed.mid_cells, packed.slots_freed
    report = make_report(cfg, keep, L - P, L, P, kept_slots, freed, time.perf_counter() - started, prefill_seconds,
                         n_kv_heads)
    return CompressedRequest(
        rid=pending.rid, row=row, config=cfg, prefix_len=P, prompt_len=L, kept_slots=kept_slots,
        mid_cells=mid_cells, mid_lens=torch.tensor(packed.lens, dtype=torch.long), report=report, keep=keep,
        owner=pending.owner,
    )
