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
3. **Two requests, one conversation**: the first to be matched borrows the record; a second one
   extending the same conversation while it is borrowed finds nothing and prefills its history
   (compressed afresh, then parked under its own ids). Of two parked conversations that both
   match, the one covering more of the input wins, the most recently used on a tie.
4. **Evictable memory**: an idle parked conversation's private slots count as evictable, like
   unlocked radix nodes (``after_evictable_size``; ``session_held_tokens`` leaves them out, so
   the pool invariant ``size = free + tree + running + session-held`` still holds with them in
   the evictable term). When SGLang evicts for an allocation and the tree cannot free enough,
   idle parked conversations go, least recently used first (``around_evict*``), before any
   admission is refused or a running request retracted. ``--kv-park-max-slots`` caps them. An
   evicted conversation's next turn is an ordinary request: prefilled, compressed, parked.
5. **Abort, retraction**: a borrowing request that aborts or is retracted takes the record with
   it (freed like any request's row; the next turn re-prefills). One aborted while still
   waiting, before anything of it ran, gives the record back untouched.

Records a borrower holds stay in the lot (``session_records`` lists every parked record), so
SGLang's invariant checker counts them as session-held, never as a running request's own.
No SGLang import at module level.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from lava_sglang.engine.state import REGISTRY

logger = logging.getLogger("lava_sglang")


@dataclass
class Parked:
    id: str
    kv: object  # SGLang's ReqKvInfo of the row (the record)
    lock: object  # TreeLock on the shared prefix (None without a tree)
    node: object  # a streaming-session virtual node: locking it is a no-op
    tokens: torch.Tensor  # int64: the ids the record's KV was computed for (valid below kv.kv_committed_len)
    extra_key: Optional[str] = None
    cache_salt: Optional[str] = None
    borrower: Optional[weakref.ref] = None
    lent_len: int = 0
    turns: int = 1
    parked_at: float = field(default_factory=time.monotonic)

    def borrowed_by(self, req) -> bool:
        return self.borrower is not None and self.borrower() is req

    @property
    def idle(self) -> bool:
        if self.borrower is not None and self.borrower() is None:
            self.borrower = None  # the borrower is gone without a release: the record is idle again
        return self.borrower is None


class ParkingLot:
    """Every parked conversation of this scheduler process, least recently used first."""

    def __init__(self):
        self.records: "collections.OrderedDict[str, Parked]" = collections.OrderedDict()
        self._ids = itertools.count()
        self._seen: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self.totals = {"parked": 0, "hits": 0, "misses": 0, "evictions": 0, "evicted_slots": 0,
                       "hit_tokens": 0, "dropped": 0, "not_parked_over_cap": 0}

    def new_id(self) -> str:
        return f"lava-park-{next(self._ids)}"

    def borrowed(self, req) -> Optional[Parked]:
        kv = getattr(req, "kv", None)
        for rec in self.records.values():
            if rec.kv is kv:
                return rec
        return None

    def idle_records(self):
        return [rec for rec in self.records.values() if rec.idle and rec.kv.holds_kv]

    def count_once(self, rid: str, hit: bool, matched: int = 0) -> None:
        """Hits and misses count requests, not scheduling rounds (a waiting request is matched again
        every round)."""
        if rid in self._seen:
            return
        self._seen[rid] = None
        while len(self._seen) > 4096:
            self._seen.popitem(last=False)
        self.totals["hits" if hit else "misses"] += 1
        self.totals["hit_tokens"] += matched
        _gauges("hits" if hit else "misses")


LOT = ParkingLot()


def _gauges(event: Optional[str] = None) -> None:
    from lava_sglang.engine import metrics

    metrics.parking(snapshot(), event)


# --------------------------------------------------------------------------------------------
# what a record holds
# --------------------------------------------------------------------------------------------

def held_slots(kv) -> int:
    """Private slots a record holds: its range past the shared prefix, less what compression freed."""
    if not kv.holds_kv:
        return 0
    held = max(0, int(kv.kv_allocated_len) - int(kv.cache_protected_len))
    state = REGISTRY.compressed.get(int(kv.req_pool_idx))
    if state is not None:
        lo, hi = state.freed_range
        lo, hi = max(lo, int(kv.cache_protected_len)), min(hi, int(kv.kv_allocated_len))
        held -= max(0, hi - lo)
    return held


def idle_parked_rows() -> set:
    return {int(rec.kv.req_pool_idx) for rec in LOT.idle_records()}


def idle_held_slots() -> int:
    return sum(held_slots(rec.kv) for rec in LOT.idle_records())


def snapshot() -> dict:
    records = [rec for rec in LOT.records.values() if rec.kv.holds_kv]
    return {"parked_conversations": len(records), "parked_idle": len(LOT.idle_records()),
            "parked_slots": sum(held_slots(rec.kv) for rec in records),
            **{f"park_{k}": v for k, v in LOT.totals.items()}}


def _enabled_for(req) -> bool:
    from lava_sglang.engine.hooks import request_config

    config = request_config(req)
    return config.enabled and config.park


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = torch.nonzero(a[:n] != b[:n])
    return int(diff[0, 0]) if diff.numel() else n


def _key_tensor(key) -> torch.Tensor:
    ids = key.raw_token_ids() if hasattr(key, "raw_token_ids") else key.token_ids
    return torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# releasing a record
# --------------------------------------------------------------------------------------------

def _release(cache, rec: Parked, reason: str) -> int:
    """Free an idle record: its tree lock, its row's private slots (``free_kv_row``, which skips
    what compression freed), the row and its compressed state. Returns the slots freed."""
    from lava_sglang.engine.accounting import after_release

    LOT.records.pop(rec.id, None)
    freed = held_slots(rec.kv)
    cache.unlock(rec.lock)
    rec.lock = None
    kv = rec.kv
    row = int(kv.req_pool_idx) if kv.holds_kv else None
    if row is not None:
        cache.free_kv_row(kv, [(kv.cache_protected_len, kv.kv_allocated_len)])
        cache.req_to_token_pool.free(rec)
        if REGISTRY.compressed.pop(row, None) is not None:
            REGISTRY.totals["released_requests"] += 1
    logger.info("lava-sglang: parked conversation %s released (%s): %d slots freed", rec.id, reason, freed)
    after_release(cache, row)
    return freed


def _hand_back(rec: Parked, req) -> None:
    """A borrowing request leaves with the record (abort, retraction, parking off): the record
    and the tree lock become the request's, and SGLang releases them as any request's."""
    LOT.records.pop(rec.id, None)
    req.lock, rec.lock = rec.lock, None
    LOT.totals["dropped"] += 1


def evict_parked(cache, need_slots: int, reason: str = "memory") -> int:
    """Release idle parked conversations, least recently used first, until ``need_slots`` slots
    are freed or none is left. Returns the slots freed."""
    freed = 0
    for rec in LOT.idle_records():
        if freed >= need_slots:
            break
        freed += _release(cache, rec, reason)
        LOT.totals["evictions"] += 1
        _gauges("evictions")
    LOT.totals["evicted_slots"] += freed
    return freed


def _enforce_cap(cache, incoming: int) -> bool:
    """Make room under ``--kv-park-max-slots`` for a record of ``incoming`` slots; False when it
    cannot fit even alone."""
    from lava_sglang.engine.hooks import server_config

    cap = server_config().park_max_slots
    if cap <= 0:
        return True
    if incoming > cap:
        return False
    held = sum(held_slots(rec.kv) for rec in LOT.records.values())
    if held + incoming > cap:
        evict_parked(cache, held + incoming - cap, reason="--kv-park-max-slots")
    return True


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
    rec.borrower = weakref.ref(req)
    rec.lent_len = prefix_len
    LOT.records.move_to_end(rec.id)
    return MatchResult(device_prefix_len=prefix_len, last_device_node=rec.node, last_host_node=rec.node,
                       best_match_node=rec.node, cache_protected_len=kv.cache_protected_len)


def _find(key, tokens: torch.Tensor) -> tuple[Optional[Parked], int]:
    """The idle record covering most of ``tokens`` past its compressed range, and the match length."""
    best, best_len = None, -1
    for rec in LOT.idle_records():
        if rec.extra_key != key.extra_key or rec.cache_salt != getattr(key, "cache_salt", None):
            continue
        state = REGISTRY.compressed.get(int(rec.kv.req_pool_idx))
        if state is None:
            continue
        n = min(_common_prefix(tokens, rec.tokens), int(rec.kv.kv_committed_len), tokens.numel())
        if n < state.prompt_len:  # the compressed range is append-only: the request must repeat all of it
            continue
        if n >= best_len:  # later records are more recently used
            best, best_len = rec, n
    return best, best_len


def around_try_match_prefix(original, self, params, *args, **kwargs):
    """``StreamingSession.try_match_prefix``: a session's own match first; else a request without
    a session borrows the parked conversation its input extends."""
    result = original(self, params, *args, **kwargs)
    req = params.req
    if result is not None or req is None or getattr(req, "session", None) is not None:
        return result
    rec = LOT.borrowed(req) if LOT.records else None
    if rec is None and (req.kv.holds_kv or req.to_finish is not None or not _enabled_for(req)):
        return result  # a request holding its own row (a later chunk), an aborted one, parking off
    tokens = _key_tensor(params.key)
    if rec is not None:  # matched again while waiting: the same record, the same match
        n = min(_common_prefix(tokens, rec.tokens), int(rec.kv.kv_committed_len), tokens.numel())
        return _lend(self, req, rec, n)
    rec, n = _find(params.key, tokens)
    if rec is None:
        LOT.count_once(req.rid, hit=False)
        return result
    LOT.count_once(req.rid, hit=True, matched=n)
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

    rec = LOT.borrowed(req)
    kv = req.kv
    row = int(kv.req_pool_idx) if kv.holds_kv else None
    state = REGISTRY.compressed.get(row) if row is not None else None
    finished = req.finished() and not isinstance(req.finished_reason, FINISH_ABORT)
    # Without a tree (--disable-radix-cache) SGLang never evicts, so parked memory could not be
    # given back: nothing is parked.
    parkable = (finished and getattr(req, "session", None) is None and state is not None and state.rid == req.rid
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
    if not _enforce_cap(self, held_slots(kv) if rec is None else 0):
        LOT.totals["not_parked_over_cap"] += 1
        if rec is not None:
            _hand_back(rec, req)
        return False
    if rec is None:
        from sglang.srt.session.streaming_session import _VirtualNode

        key_extra = getattr(req, "extra_key", None)
        rec = Parked(id=LOT.new_id(), kv=kv, lock=req.lock, node=_VirtualNode(), tokens=tokens, extra_key=key_extra,
                     cache_salt=getattr(req, "cache_salt", None) or None)
        req.lock = None
        LOT.records[rec.id] = rec
    else:
        rec.tokens, rec.turns = tokens, rec.turns + 1
        LOT.records.move_to_end(rec.id)
    rec.borrower = None
    rec.parked_at = time.monotonic()
    req.detach_kv()
    LOT.totals["parked"] += 1
    logger.info("lava-sglang: request %s parked as %s (turn %d, %d tokens, %d slots)", req.rid, rec.id, rec.turns,
                tokens.numel(), held_slots(kv))
    _gauges()
    return True


def after_session_records(result, self, *args, **kwargs):
    """``UnifiedRadixCache.session_records``: parked records are records no request owns."""
    if LOT.records:
        result = dict(result)
        result.update({rec.id: rec.kv for rec in LOT.records.values()})
    return result


def after_evictable_size(result, self, *args, **kwargs):
    """``UnifiedRadixCache.evictable_size``: idle parked slots are evictable (admission counts them)."""
    return result + idle_held_slots() if LOT.records else result


def around_evict(original, self, params, *args, **kwargs):
    """``UnifiedRadixCache.evict``: the tree first, then idle parked conversations (LRU)."""
    result = original(self, params, *args, **kwargs)
    short = int(getattr(params, "num_tokens", 0) or 0) - int(result.num_tokens_evicted)
    if short > 0 and LOT.records:
        result.num_tokens_evicted += evict_parked(self, short)
    return result


def around_evict_for_alloc(original, self, params, *args, **kwargs):
    """``UnifiedRadixCache.evict_for_alloc``: as ``around_evict``, towards the allocation's target."""
    allocator = self.token_to_kv_pool_allocator
    target = allocator.available_size() + int(getattr(params, "num_tokens", 0) or 0)
    result = original(self, params, *args, **kwargs)
    short = target - allocator.available_size()
    if short > 0 and LOT.records:
        result.num_tokens_evicted += evict_parked(self, short)
    return result


def after_reset(result, self, *args, **kwargs):
    """``UnifiedRadixCache.reset`` (``/flush_cache``, idle only): the pools are cleared next, so
    every parked record and every compressed state goes without freeing slot by slot."""
    LOT.records.clear()
    REGISTRY.compressed.clear()
    REGISTRY.pending.clear()
    return result


def after_release_aborted_request(result, self, req, *args, **kwargs):
    """``Scheduler._release_aborted_request``: a request aborted while waiting, before anything of
    it ran, gives the record it borrowed back untouched."""
    rec = LOT.borrowed(req) if LOT.records else None
    if rec is not None and int(rec.kv.kv_allocated_len) == rec.lent_len and self.chunked_req is not req:
        from sglang.srt.managers.schedule_batch import ReqKvInfo

        rec.borrower = None
        req.kv = ReqKvInfo()
        logger.info("lava-sglang: request %s aborted while waiting; parked conversation %s stays", req.rid, rec.id)
    return result
