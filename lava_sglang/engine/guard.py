"""The chunked and decode bounds, enforced at run time.

A request admitted on its chunked bound (``engine.long_prompts``) was let in on the promise that
its private slots never exceed ``budget + chunk + window + 1`` (``chunked.peak_bound``); three of
SGLang's safeguards were lifted on it. After every forward that ran a chunk of it and left more
to come, this checks that the next chunk keeps the promise: the slots it holds past its shared
prefix (after that chunk's selection, if any), plus the next chunk. If not (a selection that did
not happen, chunks SGLang cut shorter than the window round after round) and the pool cannot hold
that next chunk either (free plus evictable slots; otherwise a warning and it goes on), the
request is aborted through SGLang's chunked-request abort path (``failures.abort``) with an error naming
the bound, before the next chunk is allocated: SGLang would otherwise force that chunk ("a
continuation must make progress") into a pool that cannot hold it, and the scheduler would die
with every user's requests. The same for a request admitted on its decode peak
(``engine.decode_admission``): after each decode step and its selections, one that holds more
than that peak while the pool cannot hold the batch's next tokens is aborted alone
(:func:`after_decode_step`). No SGLang import at module level.
"""

from __future__ import annotations

import logging

from lava_sglang.engine.chunked import next_chunk_overflow
from lava_sglang.engine.decode_admission import PROMISED, held_now
from lava_sglang.engine.failures import abort, aborting
from lava_sglang.engine.long_prompts import ON_BOUND, chunk_size, lifted_config, resident_slots
from lava_sglang.engine.settings import request_config
from lava_sglang.engine.state import REGISTRY, private_slots

logger = logging.getLogger("lava_sglang")

TOTALS = {"bound_aborts": 0}
_WARNED = "_lava_over_decode_peak"  # on SGLang's Req: warned once that it holds more than its decode peak


def after_chunk(batch) -> None:
    """After an extend forward: the request SGLang is prefilling chunk by chunk (at most one per
    batch) is aborted when its next chunk would take it past its bound."""
    scheduler = REGISTRY.scheduler
    req = getattr(scheduler, "chunked_req", None) if scheduler is not None else None
    if req is None or req.kv.req_pool_idx is None or aborting(req):
        return
    index = next((i for i, r in enumerate(batch.reqs) if r is req), None)
    if index is None or not getattr(req, ON_BOUND, False):
        return  # admitted by SGLang's own rules on its whole prompt: no bound was promised
    config = lifted_config(req)
    if config is None:
        return
    chunk = chunk_size(scheduler)
    chunk_hi = int(batch.prefix_lens[index]) + int(batch.extend_lens[index])
    held = private_slots(req, chunk_hi)
    bound = resident_slots(config, chunk)
    remaining = len(req.full_untruncated_fill_ids) - chunk_hi
    if not next_chunk_overflow(bound, held, chunk, remaining):
        return
    if _room(scheduler) >= min(chunk, remaining):
        # over its bound (chunks SGLang cut short), but the pool holds the next chunk: it goes on,
        # and its next full chunk is selected again
        logger.warning("lava-sglang: request %s holds %d private slots after %d tokens, over its chunked bound %d; "
                       "the pool still holds its next chunk", req.rid, held, chunk_hi, bound)
        return
    message = (f"lava-sglang: request {req.rid} was admitted on its chunked prefill bound of {bound} KV slots "
               f"(kv_budget {config.budget} + --chunked-prefill-size {chunk} + kv_window {config.window} + 1), and "
               f"its next chunk would exceed it: it holds {held} private slots after {chunk_hi} of "
               f"{chunk_hi + remaining} tokens; aborted")
    _abort(req, message)


def _room(scheduler) -> int:
    """Slots the pool can still give: free and evictable."""
    return int(scheduler.token_to_kv_pool_allocator.available_size()) + int(scheduler.tree_cache.evictable_size())


def _abort(req, message: str) -> None:
    if abort(req, message):
        TOTALS["bound_aborts"] += 1
        logger.error(message)


def after_decode_step(step) -> None:
    """After a decode forward (and its selections): a request admitted on its decode peak
    (``engine.decode_admission``) that holds more than that peak, while the pool cannot hold the
    batch's next tokens, is aborted alone, with an error naming the bound; with room it goes on
    (a warning), and its next selection brings it back."""
    for i, _win, _position in step.windows:
        req = step.reqs[i]
        promised = getattr(req, PROMISED, None)
        if promised is None or aborting(req) or req.kv.req_pool_idx is None:
            continue
        held = held_now(req)
        if held <= promised:
            continue
        scheduler = REGISTRY.scheduler
        if scheduler is None or _room(scheduler) >= len(step.reqs):
            if getattr(req, _WARNED, False):
                continue
            setattr(req, _WARNED, True)
            logger.warning("lava-sglang: request %s holds %d private slots, over the decode peak %d it was admitted "
                           "on; the pool still holds its next token", req.rid, held, promised)
            continue
        config = request_config(req)
        message = (f"lava-sglang: request {req.rid} was admitted on its decode bound of {promised} KV slots "
                   f"(kv_decode_budget {config.decode_budget} + kv_decode_interval {config.decode_interval} + 1, or "
                   f"what it held when it began generating + kv_window {config.window}), and holds {held} after "
                   f"{len(req.output_ids)} generated tokens with the pool full; aborted")
        _abort(req, message)
