"""Memory accounting the plugin exposes (``/server_info``) and the debug invariant checks.

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

from lava_sglang.engine.parking import idle_parked_rows
from lava_sglang.engine.parking import snapshot as parking_snapshot
from lava_sglang.engine.state import REGISTRY


def debug_enabled() -> bool:
    return os.environ.get("LAVA_SGLANG_DEBUG", "").strip() not in ("", "0", "false", "no")


# How many times the debug invariants were checked (shown in /server_info).
DEBUG_COUNTS = {"after_compression": 0, "after_release": 0}


def _free_slots(allocator) -> torch.Tensor:
    parts = [getattr(allocator, "free_pages", None), getattr(allocator, "release_pages", None)]
    parts += list(getattr(allocator, "free_group", None) or [])  # freed inside a free group, not merged yet
    parts = [p.to(torch.long).cpu() for p in parts if isinstance(p, torch.Tensor) and p.numel()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def snapshot(scheduler) -> dict:
    allocator = scheduler.token_to_kv_pool_allocator
    tree = scheduler.tree_cache
    idle = idle_parked_rows()
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
