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
   budget per (layer, head), the window included, whatever its number of turns; a cell kept at
   turn 1 may be dropped at turn 5 (``earlier_kept_cells_dropped`` in the turn's report).

Whether a chunk continues a compressed row is decided by the row's state and the request
object (``state.owns``), never by rid: a client may reuse one rid for every turn. A new turn is
never published to the radix tree. The session's accounting lives in ``engine.accounting``
(``session_held_tokens``) and ``engine.release`` (``release_session``). No SGLang import at
module level.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from lava_sglang.engine.accounting import debug_check
from lava_sglang.engine.cells import pool_cells
from lava_sglang.engine.chunked import (begin_tally, chunk_report, chunk_target, is_chunked, note_kept, note_peak,
                                        selection_config, tally_selection)
from lava_sglang.engine.compress import Candidates, make_report, select_and_pack
from lava_sglang.engine.failures import fail_request, inject
from lava_sglang.engine.report import META_KEY, attach, count_selection, record
from lava_sglang.engine.settings import request_config, should_compress
from lava_sglang.engine.state import REGISTRY, CompressedRequest, PendingRequest, owner_ref, owns
from lava_sglang.policies import get_policy

logger = logging.getLogger("lava_sglang")


def begin_turn(state: CompressedRequest, req, config, turn_end: int, chunk_lo: int) -> None:
    """A new turn (request ``req``) starts on the compressed row of ``state``."""
    state.rid = req.rid
    state.owner = owner_ref(req)
    state.turns += 1
    state.kv = req.kv
    state.reselect = None
    req.skip_radix_cache_insert = True  # a compressed row is never published to the tree
    REGISTRY.totals["continued_turns"] += 1
    REGISTRY.totals["continued_prefill_tokens"] += turn_end - chunk_lo
    if turn_end - chunk_lo >= config.window and should_compress(config, state.prefix_len, turn_end):
        state.reselect = PendingRequest(rid=req.rid, row=state.row, config=config, prefix_len=state.prefix_len,
                                        prompt_len=turn_end, owner=state.owner)


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
             prefill_seconds: float = 0.0, decode: bool = False) -> Optional[dict]:
    """Re-select the history of ``state`` with the captured window of its running turn and
    repack it (module docstring, step 3). Returns the turn's report, or None when everything
    fits in the budget (the layout then stays as it is). ``decode``: a selection while the
    request generates (``engine.decode_compression``), which reports apart from its turn."""
    started = time.perf_counter()
    pend, state.reselect = state.reselect, None
    cfg, row, P, L, end = pend.config, state.row, state.prefix_len, state.prompt_len, pend.prompt_len
    w = cfg.window
    policy = get_policy(cfg.policy)  # scoring; selection is select_and_pack's
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
    candidates = [[Candidates(torch.cat([heads[layer][h], space.cells(layer, appended, h)]),
                              torch.cat([state.keep[layer][h].cpu(), torch.arange(L, end, dtype=torch.long)]),
                              int(m[layer, h]) + A - w) for h in range(H)] for layer in range(n_layers)]
    owned = torch.cat([slots[P:P + state.kept_slots], appended])
    packed = select_and_pack(cfg, candidates, scores, P, owned, req_to_token, row, space, allocator, end)
    if packed is None:
        return None
    earlier = int(m.sum())
    dropped = sum(int(m[layer, h]) - int((idx < int(m[layer, h])).sum())
                  for layer in range(n_layers) for h, idx in enumerate(packed.chosen[layer]))
    keep, kept_slots, mid_cells, freed, lens = packed.keep, packed.kept_slots, packed.mid_cells, packed.slots_freed, packed.lens
    state.prompt_len, state.kept_slots, state.mid_cells = end, kept_slots, mid_cells
    state.mid_lens = torch.tensor(lens, dtype=torch.long)
    state.keep, state.config = keep, cfg
    report = make_report(cfg, keep, end - P, end, P, kept_slots, freed, time.perf_counter() - started, prefill_seconds, H)
    report.update({"turn": state.turns, "continued": True, "reselected": True,
                   "earlier_kept_cells": earlier, "earlier_kept_cells_dropped": dropped})
    if not decode:
        state.report = report
        REGISTRY.totals["earlier_kept_cells_dropped"] += dropped
    return report


def continued_state(req, chunk_lo: int, chunk_hi: int, req_to_token, space) -> Optional[CompressedRequest]:
    """The compressed state this chunk continues over (a session's or a parked conversation's
    row, or the request's own earlier chunks under chunked prefill compression), or None. A new
    turn (another request object on the row's record) begins here."""
    row = int(req.kv.req_pool_idx)
    state = REGISTRY.compressed.get(row)
    if state is None:
        return None
    turn_end = len(req.full_untruncated_fill_ids)
    if not owns(state, req):  # a new turn (session or parked conversation), whatever its rid
        if state.kv is not req.kv:  # not the session's record: a stale state, never read it
            logger.warning("lava-sglang: row %d: dropping the state of %s (request %s is not its continuation)",
                           row, state.rid, req.rid)
            REGISTRY.drop(row)
            return None
        begin_turn(state, req, request_config(req), turn_end, chunk_lo)
        begin_tally(state)
    if chunk_lo < state.prompt_len:
        rewind(state, chunk_lo, req_to_token, space)
    config = request_config(req)
    if is_chunked(config) and chunk_hi <= turn_end:
        _aim_chunk(state, req, config, chunk_lo, chunk_hi, turn_end)
    return state


def _aim_chunk(state: CompressedRequest, req, config, chunk_lo: int, chunk_hi: int, turn_end: int) -> None:
    """Chunked prefill compression (``engine.chunked``): the selection this prompt chunk feeds."""
    target = chunk_target(config, chunk_lo, chunk_hi, turn_end)
    pend = state.reselect
    if target is not None:
        config = selection_config(config, final=target >= turn_end)
    if target is None or not should_compress(config, state.prefix_len, target):
        if pend is not None and pend.prompt_len != turn_end:
            state.reselect = None
        return
    if pend is None or pend.prompt_len != target:
        state.reselect = PendingRequest(rid=req.rid, row=state.row, config=config, prefix_len=state.prefix_len,
                                        prompt_len=target, owner=state.owner)
    else:
        pend.config = config


def finish_turn(worker, req, state: CompressedRequest, chunk_hi: int, elapsed: float) -> None:
    """After a forward of a turn that continues over ``state``: once its prompt is complete,
    re-select the history and report the turn (under chunked prefill compression, re-select
    after the chunks that ``engine.chunked`` aims at as well)."""
    pend = state.reselect
    if pend is not None:
        pend.prefill_seconds += elapsed
    end = len(req.full_untruncated_fill_ids)
    chunked = is_chunked(request_config(req)) and chunk_hi <= end
    if chunked:
        state.chunk_prefill_s += elapsed
        note_peak(state, state.kept_slots + chunk_hi - state.prompt_len, chunk_hi)
    if chunk_hi < end:
        if chunked and pend is not None and pend.prompt_len == chunk_hi:
            _reselect_chunk(worker, req, state, pend)
        return  # more chunks to come
    first = chunked and state.turns == 1  # a first turn compressed chunk by chunk reports once, here
    report = None
    if pend is None or pend.prompt_len != chunk_hi:  # a turn too short to re-select, or a re-admission
        state.reselect = None
        info = (req.customized_info or {}).get(META_KEY)
        if info and set(info[0]) != {"parked"} and not first:
            return
    else:
        ok, report = _run_reselect(worker, req, state, pend)
        if not ok:
            return
    if report is None:  # everything fits the budget: the layout stays as it is, the turn's tokens appended
        appended = max(0, end - state.prompt_len)
        report = dict(state.report, turn=state.turns, continued=state.turns > 1, reselected=False, prompt_tokens=end,
                      private_tokens=end - state.prefix_len, private_slots=state.kept_slots + appended,
                      slots_held=state.prefix_len + state.kept_slots + appended)
        if chunked:  # its selections are in the tally already
            report.update(compression_ms=0.0, slots_freed=0)
    elif chunked:
        tally_selection(state, report)
        note_kept(state, state.kept_slots)
    if chunked:
        report.update(chunk_report(state), continued=state.turns > 1)
    if first or report.get("reselected"):
        record(worker, req, report, first=first, selected=bool(report.get("reselected")))
    else:
        attach(req, report)


def _run_reselect(worker, req, state: CompressedRequest, pend: PendingRequest) -> tuple[bool, Optional[dict]]:
    """``reselect`` with the captured window of ``pend``; (False, None) when the window is
    incomplete (not re-selected) or the re-selection failed (the request fails alone, the layout
    is as before)."""
    if any(q is None for q in pend.queries) or len(pend.queries) != len(state.mid_cells):
        logger.warning("lava-sglang: request %s: window queries missing; history not re-selected", req.rid)
        state.reselect = None
        return False, None
    runner = worker.model_runner
    try:
        inject("reselect", req)
        return True, reselect(state, runner.req_to_token_pool.req_to_token, runner.token_to_kv_pool,
                              runner.token_to_kv_pool_allocator, prefill_seconds=pend.prefill_seconds)
    except Exception as exc:  # scoring or selection raised: the layout is as before, the request fails alone
        fail_request(req, "reselect", exc)
        return False, None


def _reselect_chunk(worker, req, state: CompressedRequest, pend: PendingRequest) -> None:
    """Re-select after a prompt chunk that is not the last (``engine.chunked``): the next chunk
    attends over the new layout. Nothing is reported until the prompt is complete."""
    ok, report = _run_reselect(worker, req, state, pend)
    if ok and report is not None:
        tally_selection(state, report, mid_prompt=True)
        note_kept(state, state.kept_slots)
        count_selection(report)
        debug_check(worker)
