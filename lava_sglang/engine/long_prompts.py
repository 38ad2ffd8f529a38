"""Prompts longer than the KV pool, for requests compressed during chunked prefill
(``engine.chunked``).

SGLang bounds every prompt by the pool. ``TpModelWorker.get_worker_info`` sets
``max_req_len = min(context_len - 1, kv_capacity - 1)`` and ``max_req_input_len = max_req_len - 5``;
the scheduler refuses a longer prompt (``validate_input_length``), clips ``max_new_tokens`` to
``max_req_len - input_len - 1`` (``Scheduler.init_req_max_new_tokens``), and admits a request
only when its whole prompt and its output reserve fit what is free
(``PrefillAdder._check_prefill_budget``). A request compressed chunk by chunk holds at most
budget + chunk + window slots of its own, so for it, and only for it:

* the pool part of the length limit is lifted; the context-length part stays;
* its output is bounded by the context length and by what the pool holds beside its budget;
* admission counts one chunk, the budget, the window and its output reserve, not the prompt.

Admission counts only what is enforced (``docs/design.md``, "Admission on the bound"): the limits
are lifted only for a request that will really be selected after every full chunk
(``chunked.not_chunkwise``: it generates, or continues a streaming session; its window fits a
chunk; ``kv_min_prompt_len`` is reached by the first chunk), and ``engine.guard`` aborts it if
it ever would exceed the bound. Its matched radix prefix ``P`` is counted: when ``P`` + bound +
output reserve cannot fit the pool, the match is capped to what fits and the rest of the prefix
is prefilled (and compressed) instead of waiting forever. The ``ignore_eos`` admission path
SGLang takes without a radix cache goes through the same check, and SGLang's
shortest-prefill-first never cuts its chunk below its window. A request that cannot fit even so
(a pool smaller than budget + window + chunk + its output reserve) gets a clear refusal; a
request configured ``chunked`` that would not be selected chunk by chunk keeps SGLang's limits,
and a prompt longer than the pool gets a 400 naming why. Under ``after`` a prompt longer than the pool is refused as by
SGLang, and the refusal says that ``kv_prefill_compression: chunked`` would serve it. Requests
without compression are left to SGLang. No SGLang import at module level.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from lava_sglang.engine.chunked import is_chunked, not_chunkwise, peak_bound
from lava_sglang.engine.decode_admission import decode_config, remaining, unclipped_max_new
from lava_sglang.engine.decode_admission import reserve as decode_reserve
from lava_sglang.engine.settings import request_config, set_request_config
from lava_sglang.engine.state import REGISTRY, held_by_row

logger = logging.getLogger("lava_sglang")

VALIDATE = "sglang.srt.managers.utils.validate_input_length"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"
POLICY = "sglang.srt.managers.schedule_policy.SchedulePolicy"
REQ = "sglang.srt.managers.schedule_batch.Req"
_RESERVE = 6  # what SGLang keeps below the context length (max_req_len - 5, minus the one token)
_MARGIN = 2  # SGLang admits on total < remaining (strict), and one slot of the allocator's own
_PREFIX_CAP = "_lava_prefix_cap"  # on SGLang's Req: the longest radix match it may take
ON_BOUND = "_lava_on_bound"  # on SGLang's Req: admitted on its chunked bound (engine.guard enforces it)
_REQUESTED = "_lava_requested_new"  # on SGLang's Req: max_new_tokens as the client sent it, before any clip


def _config(req):
    try:
        return request_config(req)
    except Exception:  # an invalid setting was refused on the tokenizer side: nothing to lift
        return None


def chunk_size(scheduler) -> int:
    return int(getattr(scheduler, "chunked_prefill_size", 0) or 0)


def resident_slots(config, chunk: int) -> int:
    """What a chunked request's own slots can reach while it is prefilled (``chunked.peak_bound``)."""
    return peak_bound(config.working_budget, config.window, chunk)


def _session(req) -> bool:
    return bool(getattr(getattr(req, "session", None), "streaming", False))


def why_not_lifted(req, config) -> Optional[str]:
    """Why ``req`` (with ``config``) is not admitted on its chunked bound; None when it is."""
    scheduler = REGISTRY.scheduler
    if scheduler is None or config is None:
        return "no scheduler"
    requested = getattr(req, _REQUESTED, req.sampling_params.max_new_tokens)
    start = int(getattr(req, "prefix_len", 0) or 0) if req.kv.holds_kv else 0  # a session's history
    return not_chunkwise(config, chunk_size(scheduler), requested, _session(req), start)


def lifted_config(req):
    """The config of ``req`` when it is admitted on its chunked bound (``chunked.not_chunkwise``
    says nothing against it, and it is not being aborted), else None."""
    if getattr(req, "to_finish", None) is not None:
        return None
    config = _config(req)
    return config if why_not_lifted(req, config) is None else None


def rechunkable(req, config) -> bool:
    """Whether ``req``, prefilled again after a retraction (prompt and output), would be compressed
    chunk by chunk within its chunked bound: an output longer than the pool is accepted only then."""
    return why_not_lifted(req, dataclasses.replace(config, prefill_compression="chunked")) is None


def rechunk_after_retraction(req) -> bool:
    """A request compressed during decode is retracted: its re-prefill (prompt and output, which
    may be longer than the pool) is compressed chunk by chunk when it can be (its settings switch
    to ``chunked``), else prefilled whole. True when chunk by chunk."""
    config = _config(req)
    if config is None or is_chunked(config):
        return config is not None
    if not rechunkable(req, config):
        return False
    set_request_config(req, dataclasses.replace(config, prefill_compression="chunked"))
    return True


def around_validate_input_length(original, req, max_req_input_len, allow_auto_truncate, *args, **kwargs):
    """The pool part of the length limit, lifted for chunked compression; why not, otherwise."""
    scheduler = REGISTRY.scheduler
    n = len(req.origin_input_ids)
    if scheduler is None or n < max_req_input_len:
        return original(req, max_req_input_len, allow_auto_truncate, *args, **kwargs)
    context_limit = int(scheduler.model_config.context_len) - _RESERVE
    config = lifted_config(req)
    if config is not None:
        if n >= context_limit:
            return original(req, context_limit, allow_auto_truncate, *args, **kwargs)
        need = resident_slots(config, chunk_size(scheduler)) + _MARGIN + 1
        pool = int(scheduler.max_total_num_tokens)
        if need > pool:
            return (f"Input length ({n} tokens) exceeds the KV pool ({pool} tokens), and compression during chunked "
                    f"prefill needs {need} slots of it (kv_budget {config.budget} + kv_window {config.window} + "
                    f"--chunked-prefill-size {chunk_size(scheduler)} + 1, and one output token with its margin): "
                    "use a smaller budget or a larger pool.")
        return None
    error = original(req, max_req_input_len, allow_auto_truncate, *args, **kwargs)
    config = _config(req)
    if not error or config is None or not config.enabled or n >= context_limit or chunk_size(scheduler) <= 0:
        return error
    if is_chunked(config):
        return error + f" Compression during chunked prefill cannot serve it: {why_not_lifted(req, config)}."
    if why_not_lifted(req, dataclasses.replace(config, prefill_compression="chunked")) is None:
        error += (" Under KV compression, \"kv_prefill_compression\": \"chunked\" (or --kv-prefill-compression "
                  "chunked) would serve it: the prompt is compressed chunk by chunk and never held whole.")
    return error


def around_init_req_max_new_tokens(original, self, req, *args, **kwargs):
    """The output bound of a lifted request: the context length, ``SGLANG_MAX_NEW_TOKENS_LIMIT``,
    and what the pool holds beside the request's bound; of a request compressed during decode
    whose prefill and decode peak fit the pool: the context length and the limit alone
    (``decode_admission.unclipped_max_new``); SGLang's otherwise."""
    try:
        setattr(req, _REQUESTED, req.sampling_params.max_new_tokens)
    except AttributeError:
        pass
    config = lifted_config(req)
    n = len(req.origin_input_ids)
    requested = req.sampling_params.max_new_tokens
    requested = (1 << 30) if requested is None else int(requested)
    decoding = decode_config(req)
    unclipped = None
    if decoding is not None and rechunkable(req, decoding):
        prefill = n if config is None else min(n, resident_slots(config, chunk_size(self)))
        unclipped = unclipped_max_new(self, req, decoding, prefill, requested)
    if unclipped is None and (config is None or n < int(self.max_req_input_len)):
        return original(self, req, *args, **kwargs)
    if unclipped is not None:
        bound = unclipped
    else:
        limit = getattr(self, "max_new_tokens_limit", None)
        if limit is not None and limit > 0:
            requested = min(requested, int(limit))
        room = int(self.max_total_num_tokens) - resident_slots(config, chunk_size(self)) - _MARGIN
        bound = min(requested, int(self.model_config.context_len) - n - 1, room)
    # at least one token while one was asked for: the request stays lifted, and validation refuses
    # it by name when the pool cannot hold its bound
    req.sampling_params.max_new_tokens = max(min(requested, 1), bound)
    if req.sampling_params.min_new_tokens > req.sampling_params.max_new_tokens:
        req.sampling_params.min_new_tokens = req.sampling_params.max_new_tokens


def _cap_prefix(req, total: int) -> bool:
    """A fresh request whose matched radix prefix ``P`` (locked while it is admitted, so not
    evictable) leaves less of the pool than ``total`` needs beside it could never be admitted:
    cap its match to what fits (0 at worst) for the next round; the rest of the prefix is then
    prefilled as its own. True when capped (this round admits nothing for it)."""
    if req.kv.holds_kv:
        return False  # a session's or parked conversation's row: its prefix is held already
    P = int(getattr(req, "prefix_len", 0) or 0)
    pool = int(REGISTRY.scheduler.max_total_num_tokens)
    if P <= 0 or P + total + _MARGIN <= pool:
        return False
    cap = max(0, pool - total - _MARGIN)
    setattr(req, _PREFIX_CAP, min(cap, int(getattr(req, _PREFIX_CAP, cap))))
    logger.info("lava-sglang: request %s: its %d-token radix match and its chunked bound (%d slots with its output "
                "reserve) do not fit the %d-slot pool together; the match is capped at %d tokens and the rest is "
                "prefilled", req.rid, P, total, pool, cap)
    return True


def around_check_prefill_budget(original, self, req, *args, total_tokens=None, extend_input_len=None, **kwargs):
    """Admission of a chunked request on what one chunk needs: its extend and total tokens are
    capped at the chunk, the budget, the window and its output reserve, less what its row holds
    already, beside its matched prefix. The output reserve of a request compressed during decode
    is the rest of its decode peak (``decode_admission.reserve``)."""
    if total_tokens is None or extend_input_len is None:
        return original(self, req, *args, total_tokens=total_tokens, extend_input_len=extend_input_len, **kwargs)
    config = lifted_config(req)
    chunk = chunk_size(REGISTRY.scheduler)
    chunkwise = config is not None and extend_input_len > chunk
    holds = max(chunk, resident_slots(config, chunk) - held_by_row(req)) if chunkwise else extend_input_len
    bounded = decode_reserve(req, holds)
    if bounded is not None:
        total_tokens -= max(0, remaining(req) - bounded)
    if chunkwise:
        reserve = max(0, total_tokens - extend_input_len)  # output reserve and SGLang's overheads
        total_tokens = min(total_tokens, holds + reserve)
        if _cap_prefix(req, total_tokens):
            return False, None
        setattr(req, ON_BOUND, True)  # engine.guard holds it to the bound from now on
    return original(self, req, *args, total_tokens=total_tokens, extend_input_len=extend_input_len, **kwargs)


def around_compute_max_prefix_len(original, self, *args, **kwargs):
    """``Req._compute_max_prefix_len``: at most the cap ``_cap_prefix`` set."""
    result = original(self, *args, **kwargs)
    cap = getattr(self, _PREFIX_CAP, None)
    return result if cap is None else min(result, cap)


def around_add_one_req(original, self, req, *args, **kwargs):
    """``PrefillAdder.add_one_req``: without a radix cache SGLang admits ``ignore_eos`` requests
    through ``add_one_req_ignore_eos``, which counts the whole prompt and skips the budget check
    above, and asserts that a chunked request has no prefix (a session turn has one: found by the
    soak); a lifted request, one with a prefix and one compressed during decode take the ordinary
    path (its reserve counts its whole output, or its decode peak)."""
    sp = req.sampling_params
    if not (sp.ignore_eos and getattr(self.tree_cache, "disable", True)) or (
            lifted_config(req) is None and int(getattr(req, "prefix_len", 0) or 0) == 0 and decode_config(req) is None):
        return original(self, req, *args, **kwargs)  # (SGLang's path asserts a request without a prefix)
    sp.ignore_eos = False
    try:
        return original(self, req, *args, **kwargs)
    finally:
        sp.ignore_eos = True


def around_shortest_prefill_chunk_limit(original, self, chunked_req, *args, **kwargs):
    """``SchedulePolicy.shortest_prefill_chunk_limit``: never below a lifted request's window (a
    shorter chunk is not selected, ``chunked.chunk_target``, and the request would grow)."""
    limit = original(self, chunked_req, *args, **kwargs)
    if limit is None:
        return None
    config = lifted_config(chunked_req)
    return limit if config is None else max(int(limit), config.window)


HOOKS = [
    (VALIDATE, around_validate_input_length, "AROUND", True),
    (f"{SCHEDULER}.init_req_max_new_tokens", around_init_req_max_new_tokens, "AROUND", True),
    (f"{ADDER}._check_prefill_budget", around_check_prefill_budget, "AROUND", True),
    (f"{ADDER}.add_one_req", around_add_one_req, "AROUND", True),
    (f"{POLICY}.shortest_prefill_chunk_limit", around_shortest_prefill_chunk_limit, "AROUND", True),
    (f"{REQ}._compute_max_prefix_len", around_compute_max_prefix_len, "AROUND", True),
]
