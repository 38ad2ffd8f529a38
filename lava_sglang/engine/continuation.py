"""Conversations that continue over their compressed cache (SGLang streaming sessions).

A streaming session (``POST /open_session`` with ``streaming: true``) owns its first turn's KV
record, the row of ``req_to_token``, and lends it to every later turn with everything before
the new tokens as the prefix (``sglang/srt/session/streaming_session.py``). When that row was
compressed, its :class:`~lava_sglang.engine.state.CompressedRequest` stays with the row after
the turn finishes, and the next turn runs over it:

1. ``begin_turn`` (first extend chunk of the new turn): the state follows the new request id,
   and when the turn brings at least ``window`` new tokens its last ``window`` queries are
   captured (the same capture as a first compression).
2. Every forward of the turn attends over the layout (``engine.layout``): the shared prefix,
   the kept cells of each (layer, KV head) and the appended tokens (earlier answers, the new
   turn). Only the new tokens are prefilled.
3. ``reselect`` (after the chunk that completes the turn's prompt): the conversation's private
   history, the kept cells, the earlier answers and the new turn, is scored again per (layer,
   KV head) against the new window and selected with the turn's budget, then repacked into the
   slots the row owns; the rest go back to the allocator. A conversation so holds about its
   budget per (layer, head) plus the window, whatever its number of turns; a cell kept at
   turn 1 may be dropped at turn 5 (``earlier_kept_cells_dropped`` in the turn's report).

Two SGLang hooks keep the session's accounting exact: ``session_held_tokens`` (what the pool
invariant checker and the metrics count as held by sessions) subtracts the slots compression
freed, and ``release_session`` (close, or a turn that aborted) drops the state once SGLang has
freed the row. No SGLang import at module level.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from lava_sglang.engine.state import REGISTRY, CompressedRequest, PendingRequest

logger = logging.getLogger("lava_sglang")


def session_records(tree_cache) -> dict:
    """``row -> ReqKvInfo`` of the KV records streaming sessions own now."""
    get = getattr(tree_cache, "session_records", None)
    if get is None:
        return {}
    return {int(kv.req_pool_idx): kv for kv in get().values() if kv.holds_kv and kv.req_pool_idx is not None}


def begin_turn(state: CompressedRequest, req, config, turn_end: int, chunk_lo: int) -> None:
    """A new turn (request ``req``) starts on the compressed row of ``state``."""
    state.rid = req.rid
    state.turns += 1
    state.kv = req.kv
    state.reselect = None
    REGISTRY.totals["continued_turns"] += 1
    REGISTRY.totals["continued_prefill_tokens"] += turn_end - chunk_lo
    if config.enabled and turn_end - chunk_lo >= config.window and turn_end - state.prefix_len > config.budget:
        state.reselect = PendingRequest(rid=req.rid, row=state.row, config=config, prefix_len=state.prefix_len,
                                        prompt_len=turn_end)


def rewind(state: CompressedRequest, chunk_lo: int, req_to_token: torch.Tensor, space) -> None:
    """SGLang extends a row again from ``chunk_lo < L``: a retracted turn re-enters with one
    token held back for its logits (``streaming_session.try_match_prefix``: "committed_len can
    exceed len(token_ids) by 1"), and recomputes the last token(s) of the compressed range.
    Those positions are in the window, kept in every (layer, head); their kept cells leave the
    layout and the row's new slots for them are read as appended tokens instead. The forward
    would write recomputed keys and values there, computed over the compressed history rather
    than the context they had: ``state.restore[l] = (old cells, new cells)`` tells the extend
    step to copy the original vectors over them in every layer, so later tokens read exactly
    what they read without the retraction. The old packed cells stay owned (slack until the
    next re-selection)."""
    P, L, K, w = state.prefix_len, state.prompt_len, state.kept_slots, state.config.window
    if chunk_lo < P + K or chunk_lo < L - w:
        raise RuntimeError(f"lava-sglang: request {state.rid} extends row {state.row} from {chunk_lo}, inside its "
                           f"compressed range [{P}, {L}) (kept slots end at {P + K}, window starts at {L - w}); "
                           "streaming sessions are append-only")
    new_slots = req_to_token[state.row, chunk_lo:L].to(torch.long)
    mid_cells, mid_lens, keep, restore = [], [], [], []
    for layer in range(len(state.mid_cells)):
        cells = torch.split(state.mid_cells[layer], state.mid_lens[layer].tolist())
        kept_l, cells_l, src, dst = [], [], [], []
        for h, positions in enumerate(state.keep[layer]):
            mask = positions < chunk_lo
            kept_l.append(positions[mask])
            cells_l.append(cells[h][mask.to(cells[h].device)])
            src.append(cells[h][(~mask).to(cells[h].device)])  # positions chunk_lo .. L-1, in order
            dst.append(space.cells(layer, new_slots, h))
        restore.append((torch.cat(src), torch.cat(dst)))
        mid_cells.append(torch.cat(cells_l))
        mid_lens.append([int(t.numel()) for t in kept_l])
        keep.append(kept_l)
    state.mid_cells, state.keep, state.restore = mid_cells, keep, restore
    state.mid_lens = torch.tensor(mid_lens, dtype=torch.long)
    state.prompt_len = chunk_lo
    logger.info("lava-sglang: request %s re-enters row %d at %d (compressed range ended at %d): the original "
                "vectors of those positions are kept", state.rid, state.row, chunk_lo, L)


def _head_scores(policy, cfg, queries, k_flat, v_flat, prefix_cells, mid_h, appended_cells, P) -> torch.Tensor:
    """One KV head's scores over its own candidates (kept cells, then appended tokens); the
    scoring of every policy is per KV head, so this is the head's row of a whole-layer call."""
    idx = torch.cat([prefix_cells, mid_h, appended_cells])
    return policy.score_layer(cfg, queries, k_flat[idx][:, None], v_flat[idx][:, None], P)[0]


def reselect(state: CompressedRequest, req_to_token: torch.Tensor, kv_pool, allocator,
             prefill_seconds: float = 0.0) -> Optional[dict]:
    """Re-select the history of ``state`` with the captured window of its running turn and
    repack it (module docstring, step 3). Returns the turn's report, or None when everything
    fits in the budget (the layout then stays as it is)."""
    from lava_sglang.engine.cells import pool_cells
    from lava_sglang.engine.compress import make_report, pack_and_free
    from lava_sglang.policies import get_policy

    started = time.perf_counter()
    pend, state.reselect = state.reselect, None
    cfg, row, P, L, end = pend.config, state.row, state.prefix_len, state.prompt_len, pend.prompt_len
    w = cfg.window
    policy = get_policy(cfg.policy)
    space = pool_cells(kv_pool)
    H = space.n_kv_heads
    k_flat, v_flat = space.k_flat, space.v_flat
    slots = req_to_token[row].to(torch.long)
    prefix_slots, appended = slots[:P], slots[L:end]
    A = end - L
    m = state.mid_lens  # [n_layers, H]
    n_layers = len(state.mid_cells)
    n_max = int(m.max()) + A - w  # scored candidates of the longest head
    heads = []  # per layer, per head: its kept cells
    scores = []
    for layer in range(n_layers):
        q = pend.queries[layer]
        g = q.shape[1] // H
        mids = list(torch.split(state.mid_cells[layer], m[layer].tolist()))
        heads.append(mids)
        rows = torch.zeros((H, n_max), dtype=torch.float32, device=q.device)
        for h in range(H):
            s = _head_scores(policy, cfg, q[:, h * g:(h + 1) * g], k_flat, v_flat, space.cells(layer, prefix_slots, h),
                             mids[h], space.cells(layer, appended, h), P)
            rows[h, :s.numel()] = s  # a head with fewer candidates is padded with zeros, dropped below
        scores.append(rows)
    sel = policy.select(cfg, scores, P, P + n_max + w)
    if not sel.compressed:
        return None
    sources, keep, lens, dropped = [], [], [], 0
    for layer in range(n_layers):
        src_l, keep_l, lens_l = [], [], []
        for h in range(H):
            m_h = int(m[layer, h])
            pos = sel.keep[layer][h].to(torch.long) - P
            old = pos[pos < m_h]
            new = torch.cat([pos[(pos >= m_h) & (pos < m_h + A - w)] - m_h, pos[pos >= n_max] - n_max + A - w])
            src_l.append(torch.cat([heads[layer][h][old], space.cells(layer, appended[new], h)]))
            keep_l.append(torch.cat([state.keep[layer][h][old.cpu()], (L + new).cpu()]))
            lens_l.append(int(old.numel() + new.numel()))
            dropped += m_h - int(old.numel())
        sources.append(torch.cat(src_l))
        keep.append(keep_l)
        lens.append(lens_l)
    owned = torch.cat([slots[P:P + state.kept_slots], appended])
    earlier = int(m.sum())
    kept_slots, mid_cells, freed = pack_and_free(sources, owned, req_to_token, row, P, space, allocator, end)
    state.prompt_len, state.kept_slots, state.mid_cells = end, kept_slots, mid_cells
    state.mid_lens = torch.tensor(lens, dtype=torch.long)
    state.keep, state.config = keep, cfg
    report = make_report(cfg, keep, end - P, end, P, kept_slots, freed, time.perf_counter() - started, prefill_seconds, H)
    report.update({"turn": state.turns, "continued": True, "reselected": True,
                   "earlier_kept_cells": earlier, "earlier_kept_cells_dropped": dropped})
    state.report = report
    REGISTRY.totals["reselections"] += 1
    REGISTRY.totals["earlier_kept_cells_dropped"] += dropped
    return report


def after_session_held_tokens(result, self, *args, **kwargs):
    """``SchedulerPoolStatsObserver.session_held_tokens``: a compressed session row holds its
    record's private range minus the slots compression gave back."""
    for row, kv in session_records(self.tree_cache).items():
        state = REGISTRY.compressed.get(row)
        if state is None:
            continue
        lo, hi = state.freed_range
        lo, hi = max(lo, int(kv.cache_protected_len)), min(hi, int(kv.kv_allocated_len))
        result -= max(0, hi - lo)
    from lava_sglang.engine.parking import idle_held_slots

    return result - idle_held_slots()  # idle parked conversations count as evictable instead


def around_release_session(original, self, session_id, *args, **kwargs):
    """``StreamingSession.release_session`` (close, or an aborted turn): SGLang frees the row
    (``free_kv_row`` skips what compression freed); then the state goes."""
    slot = self.slots.get(session_id)
    row = int(slot.kv.req_pool_idx) if slot is not None and slot.kv.holds_kv else None
    result = original(self, session_id, *args, **kwargs)
    if row is not None and REGISTRY.compressed.pop(row, None) is not None:
        REGISTRY.totals["released_requests"] += 1
    if row is not None:
        from lava_sglang.engine.accounting import after_release

        after_release(self.cache, row)
    return result
