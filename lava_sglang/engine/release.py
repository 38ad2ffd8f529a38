"""Release: a row goes back to SGLang (a finished or retracted request, a closed session, a
released parked conversation) and exactly what it holds is freed.

``BasePrefixCache.free_kv_row`` (AROUND) skips the slots compression already gave back, and
``forget`` is the one bookkeeping step of every release: the row's compression state goes
(counted once) and, with ``LAVA_SGLANG_DEBUG=1``, the invariants are checked. A compressed
request that is retracted keeps its selection for its re-prefill (``engine.replay``). No SGLang
import at module level.
"""

from __future__ import annotations

import logging

from lava_sglang.engine.accounting import after_release, session_records
from lava_sglang.engine.decode_compression import forget as forget_window
from lava_sglang.engine.long_prompts import lifted_config, rechunk_after_retraction
from lava_sglang.engine.settings import request_config
from lava_sglang.engine.state import REGISTRY, owns

logger = logging.getLogger("lava_sglang")

PREFIX_CACHE = "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache"
RELEASE = "sglang.srt.mem_cache.common.release_kv_cache"
STREAMING_SESSION = "sglang.srt.session.streaming_session.StreamingSession"


def forget(cache, row, req=None) -> None:
    """``row`` is SGLang's again: its compression state goes (a compressed one is counted as
    released) and the debug invariants run. ``req``: the request that held it, if any."""
    _drop_state(row, req)
    after_release(cache, row)  # LAVA_SGLANG_DEBUG=1: invariants after every release


def _drop_state(row, req=None) -> None:
    if row is None:
        return
    row = int(row)
    forget_window(row)
    REGISTRY.pending.pop(row, None)
    if REGISTRY.compressed.pop(row, None) is not None:
        REGISTRY.totals["released_requests"] += 1
    if req is not None and REGISTRY.examined_not_compressed(row, req):
        del REGISTRY.not_compressed[row]


def subtract_range(ranges, hole):
    """Half-open ``ranges`` minus the half-open ``hole``, ascending and disjoint."""
    lo, hi = hole
    out = []
    for start, end in ranges:
        if lo >= hi or end <= lo or start >= hi:
            out.append((start, end))
            continue
        if start < lo:
            out.append((start, lo))
        if hi < end:
            out.append((hi, end))
    return out


def around_free_kv_row(original, self, kv, ranges, *args, **kwargs):
    state = REGISTRY.compressed_for(getattr(kv, "req_pool_idx", None))
    if state is not None:
        ranges = subtract_range(list(ranges), state.freed_range)
    return original(self, kv, ranges, *args, **kwargs)


def _is_retraction(req) -> bool:
    """``release_kv_cache`` of a request that will run again (SGLang's retract_decode / retract_all)."""
    return not req.finished() and getattr(req, "to_finish", None) is None


def around_release_kv_cache(original, req, tree_cache, *args, **kwargs):
    row, rid = req.kv.req_pool_idx, req.rid
    state = REGISTRY.compressed_for(row)
    if state is not None and owns(state, req) and _is_retraction(req):
        decode = bool(request_config(req).decode_budget)
        if state.chunk_mid_prompt or lifted_config(req) is not None or decode:
            # Selected chunk by chunk (each chunk's keys were computed over the compressed history of
            # the chunks before it, which a re-prefill does not reproduce), or admitted on its
            # chunked bound (a replay prefills prompt and output whole, which that bound does not
            # cover): it is compressed afresh chunk by chunk, within its bound; nothing is replayed.
            # Selected during decode: the generated tokens' keys were computed over a history that
            # changed at every selection; the re-prefill (prompt and output) is compressed afresh.
            how = " chunk by chunk" if not decode or rechunk_after_retraction(req) else ", prompt and output whole"
            logger.warning("lava-sglang: request %s (compressed during %s) retracted; its re-prefill is "
                           "compressed again%s, not replayed: its output may differ from a run without "
                           "retraction", rid, "decode" if decode else "chunked prefill", how)
        else:
            REGISTRY.remember_retracted(state)
            if state.turns > 1:
                # SGLang frees a retracted session turn's row and prefills the whole history again;
                # the history's keys are then computed over the full context, not over the compressed
                # one the conversation had, so the replayed selection cannot make the output exact.
                logger.warning("lava-sglang: continued turn %s (turn %d) retracted; its re-prefill recomputes the "
                               "history over the full context and replays the selection: its output may differ "
                               "from a run without retraction", rid, state.turns)
            else:
                logger.info("lava-sglang: compressed request %s retracted; its re-prefill will replay its selection",
                            rid)
    kept = False
    try:
        result = original(req, tree_cache, *args, **kwargs)
        # A streaming session (or a parked conversation) kept the row: the compressed state stays
        # with it for the next turn (engine.continuation); nothing was freed.
        kept = row is not None and int(row) in session_records(tree_cache)
    finally:
        if kept:
            REGISTRY.retracted.pop(rid, None)
            REGISTRY.pending.pop(int(row), None)
        else:
            _drop_state(row, req)  # the row is free now: any state on it is stale
    after_release(tree_cache, row)  # LAVA_SGLANG_DEBUG=1: invariants after every release
    return result


def around_release_session(original, self, session_id, *args, **kwargs):
    """``StreamingSession.release_session`` (close, or an aborted turn): SGLang frees the row
    (``free_kv_row`` skips what compression freed); then the state goes."""
    slot = self.slots.get(session_id)
    row = int(slot.kv.req_pool_idx) if slot is not None and slot.kv.holds_kv else None
    result = original(self, session_id, *args, **kwargs)
    if row is not None:
        forget(self.cache, row)
    return result


HOOKS = [
    (f"{PREFIX_CACHE}.free_kv_row", around_free_kv_row, "AROUND", True),
    (RELEASE, around_release_kv_cache, "AROUND", True),
    (f"{STREAMING_SESSION}.release_session", around_release_session, "AROUND", True),
]
