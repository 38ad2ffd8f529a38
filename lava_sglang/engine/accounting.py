"""Slot accounting: what a compressed row holds, what the plugin exposes (``/server_info``) and
the debug invariant checks. The one place that clamps a row's freed range to what it holds.

``snapshot`` is what tests and benchmarks read from outside: pool size, free slots, what the
radix tree holds, and the compression totals. With ``LAVA_SGLANG_DEBUG=1`` every compression
and every release asserts that no slot is both free and referenced by a live compressed request
(its ``row[0:P+K]`` and its decode slots ``row[L:]``) and that the free list has no duplicates
(a double free).

Decode slots: a live request's length is not known here, so in debug mode a released row is
zeroed once SGLang has taken it back (``after_release``). Rows then hold zeros past what their
current request wrote, and the non-zero entries of ``row[L:]`` of a compressed request are
exactly the decode slots it holds (slot 0 is never allocated). SGLang never reads a row past
its request's length, so this changes nothing it computes.
"""

from __future__ import annotations

import os

import torch

from lava_sglang.engine.parking_lot import LOT
from lava_sglang.engine.state import REGISTRY

POOL_STATS = "sglang.srt.managers.scheduler_components.pool_stats_observer.SchedulerPoolStatsObserver"


def debug_enabled() -> bool:
    return os.environ.get("LAVA_SGLANG_DEBUG", "").strip() not in ("", "0", "false", "no")


# How many times the debug invariants were checked (shown in /server_info).
DEBUG_COUNTS = {"after_compression": 0, "after_release": 0}


def _free_slots(allocator) -> torch.Tensor:
    parts = [getattr(allocator, "free_pages", None), getattr(allocator, "release_pages", None)]
    parts += list(getattr(allocator, "free_group", None) or [])  # freed inside a free group, not merged yet
    parts = [p.to(torch.long).cpu() for p in parts if isinstance(p, torch.Tensor) and p.numel()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def freed_within(state, kv) -> int:
    """Slots of ``kv``'s private range ``[cache_protected_len, kv_allocated_len)`` that the
    compression of ``state`` gave back to the allocator."""
    lo, hi = state.freed_range
    lo, hi = max(lo, int(kv.cache_protected_len)), min(hi, int(kv.kv_allocated_len))
    return max(0, hi - lo)


def held_slots(kv) -> int:
    """Private slots a KV record holds: its range past the shared prefix, less what compression freed."""
    if not kv.holds_kv:
        return 0
    held = max(0, int(kv.kv_allocated_len) - int(kv.cache_protected_len))
    state = REGISTRY.compressed.get(int(kv.req_pool_idx))
    return held - freed_within(state, kv) if state is not None else held


def session_records(tree_cache) -> dict:
    """``row -> ReqKvInfo`` of the KV records streaming sessions (and parked conversations) own now."""
    get = getattr(tree_cache, "session_records", None)
    if get is None:
        return {}
    return {int(kv.req_pool_idx): kv for kv in get().values() if kv.holds_kv and kv.req_pool_idx is not None}


def after_session_held_tokens(result, self, *args, **kwargs):
    """``SchedulerPoolStatsObserver.session_held_tokens``: a compressed session row holds its
    record's private range minus the slots compression gave back; idle parked conversations
    count as evictable instead (``engine.admission``)."""
    for row, kv in session_records(self.tree_cache).items():
        state = REGISTRY.compressed.get(row)
        if state is not None:
            result -= freed_within(state, kv)
    return result - LOT.idle_slots


def parking_snapshot() -> dict:
    return {"parked_conversations": len(LOT), "parked_idle": LOT.idle_count, "parked_slots": LOT.idle_slots,
            "parked_borrowed": len(LOT) - LOT.idle_count, "park_max_conversations": LOT.max_conversations,
            **{f"park_{k}": v for k, v in LOT.totals.items()}}


def snapshot(scheduler) -> dict:
    allocator = scheduler.token_to_kv_pool_allocator
    tree = scheduler.tree_cache
    idle = {int(rec.kv.req_pool_idx) for rec in LOT.lru_idle() if rec.kv.holds_kv}
    live = [s for row, s in REGISTRY.compressed.items() if row not in idle]
    out = {
        "pool_size": int(getattr(allocator, "size", -1)),
        "available_slots": int(allocator.available_size()),
        "tree_evictable_tokens": int(tree.evictable_size()) if hasattr(tree, "evictable_size") else None,
        "tree_protected_tokens": int(tree.protected_size()) if hasattr(tree, "protected_size") else None,
        # requests and sessions; idle parked conversations are counted apart (parked_*)
        "live_compressed_requests": len(live),
        "pending_requests": len(REGISTRY.pending),
        "held_slots_by_compressed": {s.rid: s.prefix_len + s.kept_slots for s in live},
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in REGISTRY.totals.items()},
        **parking_snapshot(),
    }
    if debug_enabled():
        out["debug_checks"] = dict(DEBUG_COUNTS)
    return out


def check_invariants(req_to_token: torch.Tensor, allocator) -> None:
    free = _free_slots(allocator)
    if free.numel() != torch.unique(free).numel():
        raise AssertionError("lava-sglang debug: a slot is on the free list twice (double free)")
    if (free == 0).any():
        raise AssertionError("lava-sglang debug: the padding slot 0 is on the free list")
    for state in REGISTRY.compressed.values():
        row = req_to_token[state.row]
        held = row[:state.prefix_len + state.kept_slots].to(torch.long).cpu()
        if torch.isin(held, free).any():
            raise AssertionError(f"lava-sglang debug: request {state.rid} references a free slot")
        decode = row[state.prompt_len:].to(torch.long).cpu()
        decode = decode[decode != 0]
        if torch.isin(decode, free).any():
            raise AssertionError(f"lava-sglang debug: request {state.rid} references a free slot after its prompt")
        lo, hi = state.freed_range
        if (req_to_token[state.row, lo:hi] != 0).any():
            raise AssertionError(f"lava-sglang debug: request {state.rid} still points at freed slots")


def debug_check(worker) -> None:
    """After a compression (``worker``: the TpModelWorker)."""
    if debug_enabled():
        runner = worker.model_runner
        check_invariants(runner.req_to_token_pool.req_to_token, runner.token_to_kv_pool_allocator)
        DEBUG_COUNTS["after_compression"] += 1


def after_release(tree_cache, row) -> None:
    """After ``release_kv_cache`` gave back the request that held ``row`` (debug mode only).

    Zeroes the row if SGLang took it back (see the module docstring; a row a streaming session
    kept is left alone), then checks the invariants over what the live requests hold.
    """
    if not debug_enabled():
        return
    rows = tree_cache.req_to_token_pool
    if row is not None and int(row) in rows.free_slots:
        rows.req_to_token[int(row)].zero_()
    check_invariants(rows.req_to_token, tree_cache.token_to_kv_pool_allocator)
    DEBUG_COUNTS["after_release"] += 1


HOOKS = [
    (f"{POOL_STATS}.session_held_tokens", after_session_held_tokens, "AFTER", True),
]
