"""Parked conversations: a compressed request's state outlives the request, for clients that
resend the whole history (OpenAI chat clients, agent frameworks, ``sgl.function`` programs).

Such a client opens no session: turn N+1 is a new request whose input ids are turn N's prompt,
its answer and the new message. With ``--kv-policy none`` the radix tree serves the history. A
compressed history is never published to the tree (the radix rule), so without this module
every turn would prefill its whole history again.

A parked conversation is a KV record that no request owns, the way a streaming session owns
one (``sglang/srt/session/streaming_session.py``), keyed by token ids instead of a session id:

1. **Park** (``around_claim_kv_row``): a compressed request finishes (not aborted, not
   retracted, no session, ``kv_park`` on). SGLang's ``release_kv_cache`` asks the cache whether
   it claims the row; we do: the record (row, kept cells, generated tokens), its tree lock on the
   shared prefix and its :class:`~lava_sglang.engine.state.CompressedRequest` stay, keyed by
   ``prompt + output`` ids.
2. **Continue** (``around_try_match_prefix``): a request without a session whose input ids
   extend a parked conversation past its compressed range borrows the record, as a session
   turn borrows its slot's: the match is everything the record holds that the request repeats,
   only the rest is prefilled, and ``engine.continuation`` runs the turn over the compressed
   layout and re-selects the history within the budget. When the turn finishes it is parked
   again under its own ids.
   Whether a request continues a parked conversation is decided by this borrow alone, never by
   its rid (a client may reuse one rid for every turn). A request whose compression settings
   differ from the conversation's does not borrow it: it is prefilled and compressed afresh,
   and its ``meta_info["kv_compression"]`` says ``"parked": "not borrowed: settings differ ..."``.
3. **Two requests, one conversation**: the first to be matched borrows the record; a second one
   extending the same conversation while it is borrowed finds nothing and prefills its history
   (compressed afresh, then parked under its own ids). Of two parked conversations that both
   match, the one covering more of the input wins, the most recently used on a tie.
4. **A cache entry, never a reservation**: an idle parked conversation's private slots count as
   evictable, like unlocked radix nodes (``after_evictable_size``; ``session_held_tokens`` leaves
   them out, so the pool invariant ``size = free + tree + running + session-held`` still holds
   with them in the evictable term). When SGLang evicts for an allocation and the tree cannot
   free enough, idle parked conversations go, least recently used first (``around_evict*``),
   and the tree is evicted again for what their prefix locks held. Request rows, prefix-locked
   tree memory and admission races are handled in ``engine.admission``. Two caps, applied to
   every park and re-park: ``--kv-park-max-slots`` (slots) and ``--kv-park-max-conversations``
   (records; default half the request rows). An evicted conversation's next turn is an
   ordinary request: prefilled, compressed, parked.
5. **Abort, retraction**: a borrowing request that aborts or is retracted takes the record with
   it (freed like any request's row; the next turn re-prefills). One aborted while still
   waiting, before anything of it ran, gives the record back untouched.

Records a borrower holds stay in the lot (``session_records`` lists every parked record), so
SGLang's invariant checker counts them as session-held, never as a running request's own.
No SGLang import at module level.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from lava_sglang.engine import metrics
from lava_sglang.engine.accounting import debug_enabled, held_slots, parking_snapshot
from lava_sglang.engine.parking_lot import LOT, Parked, common_prefix
from lava_sglang.engine.release import forget
from lava_sglang.engine.settings import conversation_settings, request_config, server_config
from lava_sglang.engine.state import REGISTRY, owns

logger = logging.getLogger("lava_sglang")

META_KEY = "kv_compression"
STREAMING_SESSION = "sglang.srt.session.streaming_session.StreamingSession"
RADIX_CACHE = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"


def _gauges(event: Optional[str] = None) -> None:
    metrics.parking(parking_snapshot(), event)


def max_conversations(cache) -> int:
    """``--kv-park-max-conversations``, or half the request rows (each record holds one)."""
    cap = server_config().park_max_conversations
    if cap <= 0:
        rows = getattr(getattr(cache, "req_to_token_pool", None), "size", 0) or 0
        cap = max(1, int(rows) // 2)
    LOT.max_conversations = cap
    return cap


def _enabled_for(req) -> bool:
    config = request_config(req)
    return config.enabled and config.park


def _key_tensor(key) -> torch.Tensor:
    ids = key.raw_token_ids() if hasattr(key, "raw_token_ids") else key.token_ids
    return torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# releasing a record
# --------------------------------------------------------------------------------------------

def release(cache, rec: Parked, reason: str) -> int:
    """Free an idle record: its tree lock, its row's private slots (``free_kv_row``, which skips
    what compression freed), the row and its compressed state. Returns the slots freed."""
    freed = held_slots(rec.kv)
    LOT.remove(rec)
    if rec.lock is not None:
        cache.unlock(rec.lock)
    rec.lock = None
    kv = rec.kv
    row = int(kv.req_pool_idx) if kv.holds_kv else None
    if row is not None:
        cache.free_kv_row(kv, [(kv.cache_protected_len, kv.kv_allocated_len)])
        cache.req_to_token_pool.free(rec)
    logger.info("lava-sglang: parked conversation %s released (%s): %d slots freed", rec.id, reason, freed)
    forget(cache, row)
    return freed


def _hand_back(rec: Parked, req) -> None:
    """A borrowing request leaves with the record (abort, retraction, parking off): the record
    and the tree lock become the request's, and SGLang releases them as any request's."""
    LOT.remove(rec)
    req.lock, rec.lock = rec.lock, None
    LOT.totals["dropped"] += 1


def give_back_unused(rec: Parked, req) -> None:
    """A borrower that ran nothing returns the record idle, as it is now."""
    from sglang.srt.managers.schedule_batch import ReqKvInfo

    rec.held = held_slots(rec.kv)
    LOT.give_back(rec)
    req.kv = ReqKvInfo()


def evict_parked(cache, need_slots: int, reason: str = "memory", rows: int = 0) -> int:
    """Release idle parked conversations, least recently used first, until ``need_slots`` slots
    and ``rows`` request rows are freed or none is left. Returns the slots freed."""
    freed, freed_rows = 0, 0
    for rec in LOT.lru_idle():
        if freed >= need_slots and freed_rows >= rows:
            break
        freed_rows += 1 if rec.kv.holds_kv else 0
        freed += release(cache, rec, reason)
        LOT.totals["evictions"] += 1
        _gauges("evictions")
    LOT.totals["evicted_slots"] += freed
    return freed


def _enforce_caps(cache, incoming: int, new_record: bool) -> bool:
    """Make room under both caps for a record of ``incoming`` idle slots (a new one, or a
    borrowed one parking again); False when it cannot fit."""
    cap = server_config().park_max_slots
    if cap > 0:
        if incoming > cap:
            return False
        if LOT.idle_slots + incoming > cap:
            evict_parked(cache, LOT.idle_slots + incoming - cap, reason="--kv-park-max-slots")
        if LOT.idle_slots + incoming > cap:
            return False
    limit = max_conversations(cache)
    over = len(LOT) + (1 if new_record else 0) - limit
    if over > 0:
        before = len(LOT)
        evict_parked(cache, 0, reason="--kv-park-max-conversations", rows=over)
        LOT.totals["evicted_over_count"] += before - len(LOT)
    return len(LOT) + (1 if new_record else 0) <= limit


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------

def _lend(session, req, rec: Parked, prefix_len: int):
    """Lend ``rec`` to ``req`` with ``prefix_len`` tokens matched (``StreamingSession`` does the
    same for a session's slot)."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchResult

    kv = rec.kv
    if kv.kv_allocated_len > prefix_len:
        session._free_tail(kv, prefix_len)  # the record's tail the request does not repeat
    req.kv = kv
    req.skip_radix_cache_insert = True  # a compressed row is never published to the tree
    LOT.lend(rec, req, prefix_len)
    return MatchResult(device_prefix_len=prefix_len, last_device_node=rec.node, last_host_node=rec.node,
                       best_match_node=rec.node, cache_protected_len=kv.cache_protected_len)


def _note(req, text: str) -> None:
    """``meta_info["kv_compression"][0]["parked"]`` (kept when the request is compressed later)."""
    if req.customized_info is None:
        req.customized_info = {}
    req.customized_info[META_KEY] = [{"parked": text}]


def _find(req, key, tokens: torch.Tensor) -> tuple[Optional[Parked], int]:
    """The idle record the request continues, if the request's settings are the conversation's."""
    rec, n = LOT.lookup(tokens, (key.extra_key, getattr(key, "cache_salt", None)), int(tokens.numel()))
    if rec is None:
        return None, -1
    mine = conversation_settings(request_config(req))
    if mine != rec.settings:
        theirs = dict(rec.settings)
        diff = ", ".join(f"{k} {v!r} vs {theirs.get(k)!r}" for k, v in mine if theirs.get(k) != v)
        if LOT.count_once(req.rid, hit=False):
            LOT.totals["not_borrowed_settings"] += 1
            _gauges("misses")
        _note(req, f"not borrowed: settings differ from the parked conversation's ({diff}); prefilled afresh")
        return None, -1
    return rec, n


def around_try_match_prefix(original, self, params, *args, **kwargs):
    """``StreamingSession.try_match_prefix``: a session's own match first; else a request without
    a session borrows the parked conversation its input extends."""
    result = original(self, params, *args, **kwargs)
    req = params.req
    if result is not None or req is None or getattr(req, "session", None) is not None:
        return result
    rec = LOT.borrowed(req) if len(LOT) else None
    if rec is None and (req.kv.holds_kv or req.to_finish is not None or not _enabled_for(req)):
        return result  # a request holding its own row (a later chunk), an aborted one, parking off
    tokens = _key_tensor(params.key)
    if rec is not None:  # matched again while waiting: the same record, unless this match is shorter
        n = min(common_prefix(tokens, rec.tokens), int(rec.kv.kv_committed_len), tokens.numel())
        if n < rec.prompt_len and int(rec.kv.kv_allocated_len) == rec.lent_len:
            # e.g. a cache-aware policy matched without a key limit, admission with logprob_start_len:
            # this match cannot reuse the compressed range, so the request prefills afresh
            give_back_unused(rec, req)
            return result
        return _lend(self, req, rec, max(n, rec.prompt_len) if n < rec.prompt_len else n)
    rec, n = _find(req, params.key, tokens)
    if rec is None:
        if LOT.count_once(req.rid, hit=False):
            _gauges("misses")
        return result
    if LOT.count_once(req.rid, hit=True, matched=n):
        _gauges("hits")
    logger.info("lava-sglang: request %s continues parked conversation %s: %d of %d tokens held", req.rid, rec.id,
                n, tokens.numel() + 1)
    return _lend(self, req, rec, n)


def _finished_tokens(req) -> tuple[torch.Tensor, int]:
    finished_len = req.finished_len if req.finished_len is not None else len(req.output_ids)
    ids = list(req.origin_input_ids) + list(req.output_ids[:finished_len])
    return torch.as_tensor(ids, dtype=torch.long), len(req.origin_input_ids) + finished_len


def _trim(cache, kv, target: int) -> None:
    """Free the record's slots past ``target`` (spec decoding or an overshoot left them)."""
    if kv.kv_allocated_len > target:
        cache.free_kv_row(kv, [(target, kv.kv_allocated_len)])
        kv.kv_allocated_len = target
    kv.kv_committed_len = min(kv.kv_committed_len, target)


def around_claim_kv_row(original, self, req, *args, **kwargs):
    """``UnifiedRadixCache.claim_kv_row`` (called by ``release_kv_cache``): a session claims its
    turn's row first; else a finished compressed request is parked, and a borrowing request that
    aborts or is retracted takes its record with it."""
    if original(self, req, *args, **kwargs):
        return True
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    rec = LOT.borrowed(req) if len(LOT) else None
    kv = req.kv
    row = int(kv.req_pool_idx) if kv.holds_kv else None
    state = REGISTRY.compressed.get(row) if row is not None else None
    finished = req.finished() and not isinstance(req.finished_reason, FINISH_ABORT)
    # Without a tree (--disable-radix-cache) SGLang never evicts, so parked memory could not be
    # given back: nothing is parked.
    parkable = (finished and getattr(req, "session", None) is None and state is not None and owns(state, req)
                and not getattr(self, "disable", False) and _enabled_for(req))
    if not parkable:
        if rec is not None:
            _hand_back(rec, req)
            if not finished:
                logger.info("lava-sglang: request %s %s; parked conversation %s goes with it", req.rid,
                            "aborted" if req.finished() else "retracted", rec.id)
        return False
    tokens, target = _finished_tokens(req)
    _trim(self, kv, target)
    held = held_slots(kv)
    if not _enforce_caps(self, held, new_record=rec is None):
        LOT.totals["not_parked_over_cap"] += 1
        if rec is not None:
            _hand_back(rec, req)
        return False
    settings = conversation_settings(state.config)
    if rec is None:
        from sglang.srt.session.streaming_session import _VirtualNode

        rec = Parked(id=LOT.new_id(), kv=kv, lock=req.lock, node=_VirtualNode(), tokens=tokens,
                     prompt_len=state.prompt_len, held=held, settings=settings,
                     namespace=(getattr(req, "extra_key", None), getattr(req, "cache_salt", None) or None))
        req.lock = None
        LOT.add(rec)
    else:
        LOT.repark(rec, tokens, state.prompt_len, held, settings)
    req.detach_kv()
    LOT.totals["parked"] += 1
    logger.info("lava-sglang: request %s parked as %s (turn %d, %d tokens, %d slots)", req.rid, rec.id, rec.turns,
                tokens.numel(), held)
    _gauges()
    return True


def after_session_records(result, self, *args, **kwargs):
    """``UnifiedRadixCache.session_records``: parked records are records no request owns."""
    if len(LOT):
        result = dict(result)
        result.update({rec.id: rec.kv for rec in LOT.records.values()})
    return result


def after_reset(result, self, *args, **kwargs):
    """``UnifiedRadixCache.reset`` (``/flush_cache``, idle only): the pools are cleared next, so
    every parked record and every compressed state goes without freeing slot by slot. In debug
    mode every row is zeroed, as a release zeroes its row (``engine.accounting``): a parked row's
    old decode slots must not look like the next request's."""
    for rec in list(LOT.records.values()):
        LOT.remove(rec)
    REGISTRY.compressed.clear()
    REGISTRY.pending.clear()
    REGISTRY.not_compressed.clear()
    rows = getattr(self, "req_to_token_pool", None)
    if debug_enabled() and rows is not None:
        rows.req_to_token.zero_()
    return result


def after_release_aborted_request(result, self, req, *args, **kwargs):
    """``Scheduler._release_aborted_request``: a request aborted while waiting, before anything of
    it ran, gives the record it borrowed back untouched."""
    rec = LOT.borrowed(req) if len(LOT) else None
    if rec is not None and int(rec.kv.kv_allocated_len) == rec.lent_len and self.chunked_req is not req:
        give_back_unused(rec, req)
        logger.info("lava-sglang: request %s aborted while waiting; parked conversation %s stays", req.rid, rec.id)
    return result


HOOKS = [
    (f"{STREAMING_SESSION}.try_match_prefix", around_try_match_prefix, "AROUND", True),
    (f"{RADIX_CACHE}.claim_kv_row", around_claim_kv_row, "AROUND", True),
    (f"{RADIX_CACHE}.session_records", after_session_records, "AFTER", True),
    (f"{RADIX_CACHE}.reset", after_reset, "AFTER", True),
    (f"{SCHEDULER}._release_aborted_request", after_release_aborted_request, "AFTER", True),
]
