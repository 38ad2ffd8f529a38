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

A request that cannot fit even so (a pool smaller than budget + window + chunk + its output
reserve) gets a clear refusal. Under ``after`` a prompt longer than the pool is refused as by
SGLang, and the refusal says that ``kv_prefill_compression: chunked`` would serve it. Requests
without compression are left to SGLang. No SGLang import at module level.
"""

from __future__ import annotations

import logging
from typing import Optional

from lava_sglang.engine.chunked import is_chunked, peak_bound
from lava_sglang.engine.settings import request_config
from lava_sglang.engine.state import REGISTRY

logger = logging.getLogger("lava_sglang")

VALIDATE = "sglang.srt.managers.utils.validate_input_length"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"
_RESERVE = 6  # what SGLang keeps below the context length (max_req_len - 5, minus the one token)


def _config(req):
    try:
        return request_config(req)
    except Exception:  # an invalid setting was refused on the tokenizer side: nothing to lift
        return None


def _chunk(scheduler) -> int:
    return int(getattr(scheduler, "chunked_prefill_size", 0) or 0)


def resident_slots(config, chunk: int) -> int:
    """What a chunked request's own slots can reach while it is prefilled (``chunked.peak_bound``)."""
    return peak_bound(config.budget, config.window, chunk)


def _lifted(req) -> Optional[tuple]:
    """(config, scheduler) when ``req`` is compressed chunk by chunk on a chunked-prefill server."""
    scheduler = REGISTRY.scheduler
    config = _config(req)
    if scheduler is None or not is_chunked(config) or _chunk(scheduler) <= 0:
        return None
    return config, scheduler


def around_validate_input_length(original, req, max_req_input_len, allow_auto_truncate, *args, **kwargs):
    """The pool part of the length limit, lifted for chunked compression; the hint otherwise."""
    scheduler = REGISTRY.scheduler
    n = len(req.origin_input_ids)
    if scheduler is None or n < max_req_input_len:
        return original(req, max_req_input_len, allow_auto_truncate, *args, **kwargs)
    context_limit = int(scheduler.model_config.context_len) - _RESERVE
    lifted = _lifted(req)
    if lifted is not None:
        config, _ = lifted
        if n >= context_limit:
            return original(req, context_limit, allow_auto_truncate, *args, **kwargs)
        need = resident_slots(config, _chunk(scheduler)) + 1
        pool = int(scheduler.max_total_num_tokens)
        if need >= pool:
            return (f"Input length ({n} tokens) exceeds the KV pool ({pool} tokens), and compression during chunked "
                    f"prefill needs {need} slots of it (kv_budget {config.budget} + kv_window {config.window} + "
                    f"--chunked-prefill-size {_chunk(scheduler)} + 1): use a smaller budget or a larger pool.")
        return None
    error = original(req, max_req_input_len, allow_auto_truncate, *args, **kwargs)
    config = _config(req)
    if error and config is not None and config.enabled and n < context_limit and _chunk(scheduler) > 0:
        error += (" Under KV compression, \"kv_prefill_compression\": \"chunked\" (or --kv-prefill-compression "
                  "chunked) would serve it: the prompt is compressed chunk by chunk and never held whole.")
    return error


def around_init_req_max_new_tokens(original, self, req, *args, **kwargs):
    """The output bound of a lifted request: the context length, and what the pool holds beside
    the request's own slots; SGLang's otherwise."""
    lifted = _lifted(req)
    n = len(req.origin_input_ids)
    if lifted is None or n < int(self.max_req_input_len):
        return original(self, req, *args, **kwargs)
    config, _ = lifted
    requested = req.sampling_params.max_new_tokens
    requested = (1 << 30) if requested is None else int(requested)
    room = int(self.max_total_num_tokens) - resident_slots(config, _chunk(self)) - 2
    bound = min(requested, int(self.model_config.context_len) - n - 1, room)
    req.sampling_params.max_new_tokens = max(0, bound)
    if req.sampling_params.min_new_tokens > req.sampling_params.max_new_tokens:
        req.sampling_params.min_new_tokens = req.sampling_params.max_new_tokens


def _held(req) -> int:
    """Private slots the request's row holds already: a session's or a parked conversation's
    compressed history that this turn continues (they are allocated, not admitted again)."""
    row = req.kv.req_pool_idx
    state = REGISTRY.compressed.get(int(row)) if row is not None else None
    return state.kept_slots if state is not None and state.kv is req.kv else 0


def around_check_prefill_budget(original, self, req, *args, total_tokens=None, extend_input_len=None, **kwargs):
    """Admission of a chunked request on what one chunk needs: its extend and total tokens are
    capped at the chunk, the budget, the window and its output reserve, less what its row holds
    already."""
    lifted = _lifted(req)
    if lifted is not None and total_tokens is not None and extend_input_len is not None:
        config, scheduler = lifted
        chunk = _chunk(scheduler)
        if extend_input_len > chunk:
            reserve = max(0, total_tokens - extend_input_len)  # output reserve and SGLang's overheads
            need = max(chunk, resident_slots(config, chunk) - _held(req))
            total_tokens = min(total_tokens, need + reserve)
    return original(self, req, *args, total_tokens=total_tokens, extend_input_len=extend_input_len, **kwargs)


HOOKS = [
    (VALIDATE, around_validate_input_length, "AROUND", True),
    (f"{SCHEDULER}.init_req_max_new_tokens", around_init_req_max_new_tokens, "AROUND", True),
    (f"{ADDER}._check_prefill_budget", around_check_prefill_budget, "AROUND", True),
]
