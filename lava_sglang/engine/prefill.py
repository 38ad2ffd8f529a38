"""Prefill: what an extend forward does for each request of its batch, before and after the
backend runs. Before (``prepare_extend``): at a request's first chunk decide whether it will be
compressed (``settings.should_compress``; a retracted one replays its selection,
``engine.replay``), capture its window queries in whichever chunk they occur, and build the
layout plan of the turns that continue over a compressed row (``engine.continuation``). After
(``finish_extend``): compress the requests whose prompt is complete (``engine.compress``) and
re-select the continued turns'. A failure in any of these fails its request only
(``engine.failures``). No SGLang import at module level.
"""

from __future__ import annotations

import logging
from typing import Optional

from lava_sglang.engine.accounting import debug_check
from lava_sglang.engine.chunked import (begin_tally, chunk_report, chunk_target, is_chunked, note_kept, note_peak,
                                        selection_config, tally_selection)
from lava_sglang.engine.compress import compress_request
from lava_sglang.engine.continuation import continued_state, finish_turn
from lava_sglang.engine.failures import fail_request, inject
from lava_sglang.engine.layout import LayoutEntry, LayoutPlan, state_mid, uncompressed_entry
from lava_sglang.engine.replay import ReplayChunk
from lava_sglang.engine.report import count_selection, record
from lava_sglang.engine.settings import request_config, should_compress
from lava_sglang.engine.state import REGISTRY, PendingRequest, owner_ref, owns
from lava_sglang.engine.steps import ExtendStep

logger = logging.getLogger("lava_sglang")


def _choose(req, prefix_len_in_row: int) -> Optional[PendingRequest]:
    """Decide at a request's first prefill chunk whether it will be compressed."""
    config = request_config(req)
    if not config.enabled:
        return None
    max_new = getattr(req.sampling_params, "max_new_tokens", None)
    session = getattr(req, "session", None)
    if max_new is not None and max_new <= 0 and not getattr(session, "streaming", False):
        return None  # prefix primers seed shared prefixes: never compressed (a session's context turn is)
    prompt_len = _selected_end(req, config)
    P = int(req.kv.cache_protected_len)
    if not should_compress(config, P, prompt_len) or P > prefix_len_in_row:
        return None
    return PendingRequest(rid=req.rid, row=int(req.kv.req_pool_idx), config=config, prefix_len=P, prompt_len=prompt_len,
                          owner=owner_ref(req))


def _selected_end(req, config) -> int:
    """Where a request's first compression ends: its prompt; prefilled again after a retraction
    while it compressed during decode, its prompt and what it generated (compressed with it,
    engine.decode_compression)."""
    if config.decode_budget and req.output_ids:
        return len(req.full_untruncated_fill_ids)
    return len(req.origin_input_ids)


def _replay_or_choose(req, prefix_len_in_row: int) -> Optional[PendingRequest]:
    """A request prefilled again after a retraction replays its selection when its shared prefix is
    the one it was compressed with; otherwise (the tree evicted or grew it) it is chosen afresh."""
    saved = REGISTRY.retracted.pop(req.rid, None)
    if saved is not None and not owns(saved, req):
        saved = None  # another request that carries the same rid: never replay its selection
    if saved is not None:
        P = int(req.kv.cache_protected_len)
        if P == saved.prefix_len and len(req.origin_input_ids) == saved.prompt_len and P <= prefix_len_in_row:
            return PendingRequest(rid=req.rid, row=int(req.kv.req_pool_idx), config=saved.config, prefix_len=P,
                                  prompt_len=saved.prompt_len, replay=saved, owner=owner_ref(req))
        logger.warning("lava-sglang: retracted request %s: shared prefix is now %d tokens (was %d); compressing "
                       "it afresh, its output may differ from a run without retraction", req.rid, P, saved.prefix_len)
    return _choose(req, prefix_len_in_row)


def _window_capture(pending, offset: int, chunk_lo: int, chunk_hi: int):
    """The rows of this chunk that fall in ``pending``'s window ``[prompt_len - w, prompt_len)``."""
    win_start = pending.prompt_len - pending.window
    lo, hi = max(chunk_lo, win_start), min(chunk_hi, pending.prompt_len)
    return (pending, offset + lo - chunk_lo, offset + hi - chunk_lo, lo - win_start) if lo < hi else None


def prepare_extend(batch, req_to_token, space):
    """Decide, per request of an extend batch, what this forward does besides the backend:
    choose for compression, capture window queries, continue over a compressed layout, replay.
    Returns the :class:`~lava_sglang.engine.steps.ExtendStep`, or None when the batch needs nothing of ours."""
    captures, replays, entries, restores = [], [], [], []
    continued = False
    offset = 0
    for i, req in enumerate(batch.reqs):
        ext, pre = int(batch.extend_lens[i]), int(batch.prefix_lens[i])
        row = req.kv.req_pool_idx
        chunk_lo, chunk_hi = pre, pre + ext
        try:
            if row is not None and (int(row) in REGISTRY.compressed or int(row) in REGISTRY.pending):
                inject("layout", req)
            state = continued_state(req, chunk_lo, chunk_hi, req_to_token, space) if row is not None else None
            if state is not None:
                entry = LayoutEntry(state.row, state.prefix_len, state.prompt_len, chunk_hi, ext, offset, state_mid(state))
        except Exception as exc:  # fail this request; the forward reads its row as it is (its output is dropped)
            fail_request(req, "layout", exc)
            _forget_row(row)
            if row is not None:
                entries.append(uncompressed_entry(int(row), chunk_hi, ext, offset))
            offset += ext
            continue
        if state is not None:
            continued = True
            if state.restore is not None:
                restores.append(state.restore)
                state.restore = None
            entries.append(entry)
            if state.reselect is not None:
                cap = _window_capture(state.reselect, offset, chunk_lo, chunk_hi)
                if cap is not None:
                    captures.append(cap)
            offset += ext
            continue
        pending = None
        if row is not None:
            row = int(row)
            pending = REGISTRY.pending.get(row)
            if pending is not None and not owns(pending, req):
                REGISTRY.drop(row)
                pending = None
            if pending is None and not REGISTRY.examined_not_compressed(row, req):
                pending = _replay_or_choose(req, pre)
                if pending is None:
                    REGISTRY.not_compressed[row] = owner_ref(req)
                else:
                    req.skip_radix_cache_insert = True
                    REGISTRY.pending[row] = pending
        if pending is not None and pending.replay is not None and chunk_hi > pending.prompt_len:
            replays.append(ReplayChunk(pending, offset, chunk_lo, chunk_hi))
            prompt_hi = min(chunk_hi, pending.prompt_len)
            if prompt_hi > chunk_lo:  # the prompt part, read as by the backend (whole-batch plans only)
                entries.append(uncompressed_entry(row, prompt_hi, prompt_hi - chunk_lo, offset))
        else:
            if pending is not None and pending.replay is None:
                config = request_config(req)
                if is_chunked(config):
                    _aim(pending, config, chunk_lo, chunk_hi, _selected_end(req, config))
                cap = _window_capture(pending, offset, chunk_lo, chunk_hi)
                if cap is not None:
                    captures.append(cap)
            if row is not None:
                entries.append(uncompressed_entry(row, chunk_hi, ext, offset))
        offset += ext
    replay_entries = [e for e in (c.layout_entry(req_to_token, space) for c in replays) if e is not None]
    if continued:
        try:
            plan = LayoutPlan(entries + replay_entries, req_to_token, space)
        except Exception as exc:  # the batch's layout cannot be read: fail the requests it continues
            for req in batch.reqs:
                if req.kv.req_pool_idx is not None and int(req.kv.req_pool_idx) in REGISTRY.compressed:
                    fail_request(req, "layout", exc)
            return None  # the backend reads every row as it is; the failed requests' output is dropped
        step = ExtendStep(captures, plan, whole_batch=True)
        step.restores = restores
        return step
    if not captures and not replay_entries and not any(r.kv.req_pool_idx is not None and
                                                        REGISTRY.pending.get(int(r.kv.req_pool_idx)) for r in batch.reqs):
        return None
    plan = LayoutPlan(replay_entries, req_to_token, space) if replay_entries else None
    return ExtendStep(captures, plan)


def _aim(pending, config, chunk_lo: int, chunk_hi: int, end: int) -> None:
    """Chunked prefill compression (``engine.chunked``): the range a not yet compressed request's
    next selection covers, whose window this chunk captures, and its settings (the working budget
    before the last)."""
    target = chunk_target(config, chunk_lo, chunk_hi, end) or end
    pending.config = selection_config(config, final=target >= end)
    if target != pending.prompt_len:
        pending.prompt_len = target
        pending.queries = []


def _forget_row(row) -> None:
    """A failed request's compression state goes; its row stays SGLang's to release."""
    if row is None:
        return
    state = REGISTRY.compressed.get(int(row))
    if state is None or state.freed_range[0] >= state.freed_range[1]:
        REGISTRY.drop(row)  # nothing was freed on the row: SGLang frees it whole
    else:
        state.reselect = None  # keep the state: release must skip what compression freed


def finish_extend(worker, batch, elapsed: float) -> None:
    runner = worker.model_runner
    for i, req in enumerate(batch.reqs):
        row = req.kv.req_pool_idx
        if row is None:
            continue
        chunk_lo = int(batch.prefix_lens[i])
        chunk_hi = chunk_lo + int(batch.extend_lens[i])
        state = REGISTRY.compressed.get(int(row))
        if state is not None and owns(state, req):
            finish_turn(worker, req, state, chunk_hi, elapsed)
            continue
        pending = REGISTRY.pending.get(int(row))
        if pending is None or not owns(pending, req):
            continue
        pending.prefill_seconds += elapsed
        if pending.replay is None:
            note_peak(pending, chunk_hi - pending.prefix_len, chunk_hi)
        if chunk_hi < len(req.full_untruncated_fill_ids):
            if not (is_chunked(pending.config) and pending.replay is None and pending.prompt_len == chunk_hi):
                continue  # more chunks to come
            if not should_compress(pending.config, pending.prefix_len, chunk_hi):
                continue  # the range so far fits the budget: nothing to select yet
        del REGISTRY.pending[pending.row]
        if pending.replay is None and (any(q is None for q in pending.queries) or not pending.queries):
            logger.warning("lava-sglang: request %s: window queries missing; not compressed", req.rid)
            continue
        try:
            inject("compress", req)
            state = compress_request(pending, runner.req_to_token_pool.req_to_token, runner.token_to_kv_pool,
                                     runner.token_to_kv_pool_allocator, prefill_seconds=pending.prefill_seconds)
        except Exception as exc:  # scoring or selection raised: nothing was freed, the request fails alone
            fail_request(req, "compress", exc)
            continue
        if state is None:
            continue
        state.kv = req.kv
        state.report["turn"] = 1
        REGISTRY.compressed[state.row] = state
        note_kept(pending, state.kept_slots)
        if pending.replay is None:
            state.report.update(peak_slots=pending.peak_slots, prefill_trace=pending.prefill_trace)
        if is_chunked(pending.config):
            mid_prompt = chunk_hi < _selected_end(req, request_config(req))
            begin_tally(state, pending.peak_slots, pending.prefill_seconds, pending.prefill_trace)
            tally_selection(state, state.report, mid_prompt=mid_prompt)
            state.report.update(chunk_report(state))
            if mid_prompt:
                count_selection(state.report)
                debug_check(worker)
                continue  # a chunk of the prompt: the rest continues over the layout (engine.chunked)
        if pending.replay is not None:
            REGISTRY.totals["replayed_requests"] += 1
            state.report["replayed_after_retraction"] = True
        record(worker, req, state.report, first=True)
