"""SGLang's admission and eviction take back what parked conversations hold, before they wait,
retract or raise. A parked conversation (``engine.parking``) is a cache entry, never a
reservation:

* **Slots**: idle parked slots count as evictable (``after_evictable_size``); when SGLang evicts
  (``around_evict``, ``around_evict_for_alloc``) the tree goes first, then idle parked
  conversations, least recently used first, then the tree again: a released conversation's
  prefix lock no longer pins its shared prefix, so that memory is evicted in the same call.
* **Request rows**: every parked conversation holds a ``req_to_token`` row, and SGLang admits
  nothing while no row is free (it never evicts for rows). Before each admission round
  (``around_get_new_batch_prefill``) idle conversations are released, LRU, until the waiting
  requests that need a row have one (up to ``--max-running-requests``).
* **Tree memory under prefix locks**: admission counts only unlocked tree memory as evictable. A
  round that admits nothing while nothing runs, with requests waiting and idle conversations
  parked, would wait forever: such a round releases the least recently used idle conversation
  (its lock with it), and the next round tries again.
* **Streaming sessions behind a blocked head**: a streaming session owns its KV between turns
  (SGLang's semantics). When the head of the queue needs more than is free while sessions hold
  the rest, and their next turns wait behind it, first-come-first-served would wait forever: in
  such a round (nothing admitted, nothing running, no idle conversation left to release) the
  waiting turns of sessions that hold KV move to the front, and stay there through SGLang's
  re-sort of the queue at every round (any ``--schedule-policy``, priority scheduling) until a
  round admits something. Serving them is what lets their clients go on and close them.
* **Admission races**: one round may admit a request on idle parked slots and lend that very
  conversation to a later request of the same round (the match runs after the earlier
  admission). When the allocation then comes up short, conversations lent to requests that are
  still waiting and ran nothing are taken back from them (the request prefills afresh when it
  is admitted) and released; never "Out of memory".

No SGLang import at module level.
"""

from __future__ import annotations

import dataclasses
import logging

from lava_sglang.engine.parking import evict_parked, give_back_unused, release
from lava_sglang.engine.parking_lot import LOT
from lava_sglang.engine.state import REGISTRY

logger = logging.getLogger("lava_sglang")

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
RADIX_CACHE = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache"
POLICY = "sglang.srt.managers.schedule_policy.SchedulePolicy"


def _waiting(scheduler) -> list:
    return list(getattr(scheduler, "waiting_queue", None) or [])


def _rows_short(scheduler, running_batch) -> int:
    """Rows the waiting requests need (those not holding a row already) beyond the free ones."""
    waiting = _waiting(scheduler)
    if not waiting:
        return 0
    running = len(getattr(running_batch, "reqs", None) or [])
    room = max(0, int(getattr(scheduler, "max_running_requests", 0) or 0) - running) or len(waiting)
    need = sum(1 for r in waiting[:room] if not r.kv.holds_kv)
    return need - int(scheduler.req_to_token_pool.available_size())


def around_get_new_batch_prefill(original, self, running_batch=None, *args, **kwargs):
    """``Scheduler.get_new_batch_prefill``: rows for the waiting requests first; after a round
    that admitted nothing with nothing running, the LRU idle conversation goes."""
    batch = running_batch if running_batch is not None else getattr(self, "running_batch", None)
    if LOT.idle_count:
        short = _rows_short(self, batch)
        if short > 0:
            before = len(LOT)
            evict_parked(self.tree_cache, 0, reason="request rows", rows=short)
            LOT.totals["evicted_for_rows"] += before - len(LOT)
            if batch is not None:
                batch.batch_is_full = False
    plan = original(self, running_batch, *args, **kwargs) if running_batch is not None else original(self, *args, **kwargs)
    stalled = (getattr(plan, "batch_to_run", None) is None and (batch is None or batch.is_empty())
               and getattr(self, "chunked_req", None) is None and getattr(self, "waiting_queue", None))
    if stalled:
        rec = next(LOT.lru_idle(), None) if LOT.idle_count else None
        if rec is not None:
            release(self.tree_cache, rec, "admission stalled: its prefix lock and slots go back to the tree")
            LOT.totals["evictions"] += 1
        elif _session_turns_first(self) or _SESSIONS_FIRST["on"]:
            _SESSIONS_FIRST["on"] = True
    elif getattr(plan, "batch_to_run", None) is not None:
        _SESSIONS_FIRST["on"] = False
    return plan


# Set by a stalled round that moved session turns first; SGLang sorts the queue again at every
# round (``SchedulePolicy.calc_priority``: lof, random, hrrn, lpm, shortest-prefill-first,
# priorities), so the order is applied after each sort until a round admits something.
_SESSIONS_FIRST = {"on": False}


def after_calc_priority(result, self, *args, **kwargs):
    """``SchedulePolicy.calc_priority``: after SGLang's sort, session turns first again while a
    stall asks for it."""
    if _SESSIONS_FIRST["on"] and REGISTRY.scheduler is not None:
        _session_turns_first(REGISTRY.scheduler, quiet=True)
    return result


def _session_turns_first(scheduler, quiet: bool = False) -> int:
    """A stalled round with nothing parked to release: the waiting turns of streaming sessions
    that hold KV go to the front of the queue, in their order (see the module docstring); when
    such a turn is the head already and cannot be admitted either, the next one goes first (one
    per stalled round, so any turn that fits is reached). Returns how many moved; 0 when nothing
    did. ``quiet`` (after SGLang's sort) keeps a head that is such a turn."""
    slots = getattr(getattr(scheduler.tree_cache, "session", None), "slots", None) or {}
    if not slots:
        return 0

    def holds(req) -> bool:
        session = getattr(req, "session", None)
        slot = slots.get(getattr(session, "session_id", None)) if session is not None else None
        return slot is not None and bool(slot.kv.holds_kv)

    waiting = scheduler.waiting_queue
    held = [holds(r) for r in waiting]
    if not any(held) or (held[0] and (quiet or sum(held) < 2)):
        return 0
    turns = [r for r, h in zip(waiting, held) if h]
    if held[0]:  # a session turn itself blocks the head: the next one gets its round (rotation)
        turns = turns[1:] + turns[:1]
    waiting[:] = turns + [r for r, h in zip(waiting, held) if not h]
    if not quiet:
            logger.info("lava-sglang: admission stalled behind request %s (sessions hold the memory it needs): %d "
                    "waiting session turn(s) go first", waiting[len(turns)].rid, len(turns))
    return len(turns)


def _reclaim_from_waiting(cache, short: int) -> int:
    """Take conversations back from borrowers that are still waiting and ran nothing, and release
    them; returns the slots freed."""
    scheduler = REGISTRY.scheduler
    if scheduler is None:
        return 0
    waiting = {id(r) for r in _waiting(scheduler)}
    freed = 0
    for rec in list(LOT.records.values()):
        if freed >= short:
            break
        req = rec.borrower() if rec.borrower is not None else None
        if req is None or id(req) not in waiting or req is getattr(scheduler, "chunked_req", None):
            continue
        if int(rec.kv.kv_allocated_len) != rec.lent_len:
            continue
        give_back_unused(rec, req)
        LOT.totals["reclaimed_from_waiting"] += 1
        logger.info("lava-sglang: request %s is still waiting; parked conversation %s taken back for an allocation",
                    req.rid, rec.id)
        freed += release(cache, rec, "allocation short")
    return freed


def after_evictable_size(result, self, *args, **kwargs):
    """``UnifiedRadixCache.evictable_size``: idle parked slots are evictable (admission counts them)."""
    return result + LOT.idle_slots if LOT.idle_slots else result


def around_evict(original, self, params, *args, **kwargs):
    """``UnifiedRadixCache.evict``: the tree, then idle parked conversations (LRU), then the tree
    again for the prefixes they had locked."""
    result = original(self, params, *args, **kwargs)
    want = int(getattr(params, "num_tokens", 0) or 0)
    short = want - int(result.num_tokens_evicted)
    if short > 0 and len(LOT):
        result.num_tokens_evicted += evict_parked(self, short)
        short = want - int(result.num_tokens_evicted)
        if short > 0:
            again = dataclasses.replace(params, num_tokens=short)
            result.num_tokens_evicted += int(original(self, again, *args, **kwargs).num_tokens_evicted)
    return result


def around_evict_for_alloc(original, self, params, *args, **kwargs):
    """``UnifiedRadixCache.evict_for_alloc``: as ``around_evict``, towards the allocation's target;
    still short, conversations lent to requests that have not run are taken back."""
    allocator = self.token_to_kv_pool_allocator
    target = allocator.available_size() + int(getattr(params, "num_tokens", 0) or 0)
    result = original(self, params, *args, **kwargs)
    short = target - allocator.available_size()
    if short > 0 and len(LOT):
        result.num_tokens_evicted += evict_parked(self, short)
        short = target - allocator.available_size()
        if short > 0:
            result.num_tokens_evicted += _reclaim_from_waiting(self, short)
            short = target - allocator.available_size()
        if short > 0:
            again = dataclasses.replace(params, num_tokens=short)
            result.num_tokens_evicted += int(original(self, again, *args, **kwargs).num_tokens_evicted)
    return result


HOOKS = [
    (f"{RADIX_CACHE}.evictable_size", after_evictable_size, "AFTER", True),
    (f"{RADIX_CACHE}.evict", around_evict, "AROUND", True),
    (f"{RADIX_CACHE}.evict_for_alloc", around_evict_for_alloc, "AROUND", True),
    (f"{SCHEDULER}.get_new_batch_prefill", around_get_new_batch_prefill, "AROUND", True),
    (f"{POLICY}.calc_priority", after_calc_priority, "AFTER", True),
]
