"""Admission that knows the decode bound (``engine.decode_compression``).

SGLang reserves room for each request's whole future output: a running request's remaining
``max_new_tokens`` (``PrefillAdder._get_running_request_total_token_offset``), a new request's
own in its admission check (``_check_prefill_budget``) and in the budget it commits
(``_update_prefill_budget``), and it clips ``max_new_tokens`` to what the pool holds beside the
prompt (``Scheduler.init_req_max_new_tokens``). A request compressed during decode never holds
more than its peak, :func:`peak` (``max(start + w, N + D) + 1`` private slots, ``start`` being
what it holds when it begins generating; at most ``max(kv_budget, N) + D + 1``), so for it, and
only for it:

* a running request reserves what it can still grow to under its peak, from what it holds now
  (:func:`growth`), never more than SGLang would: memory a decode selection frees is admitted
  into at the next round;
* a new request reserves the part of its peak beyond what its prefill holds (:func:`reserve`);
* its output is clipped by the context length and ``SGLANG_MAX_NEW_TOKENS_LIMIT``, not by the
  pool, when its prefill and its peak fit the pool (:func:`unclipped_max_new`): an output longer
  than the pool is served.

SGLang's decode-memory check asks for one slot per running request and retracts when they are not
there; it needs no change: a selection frees slots after the step that reached its interval,
before the next check. Admission counts only what is enforced: after every decode step
``engine.decode_compression`` selects at the interval, and a request that still holds more than
its promised peak (:data:`PROMISED`) is aborted alone when the pool cannot hold its next token
(``engine.guard.after_decode_step``). No SGLang import at module level.
"""

from __future__ import annotations

import os
from typing import Optional

from lava_sglang.engine.decode_compression import WINDOWS
from lava_sglang.engine.settings import request_config, should_compress
from lava_sglang.engine.state import REGISTRY, held_by_row, owns, private_slots

ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"
PROMISED = "_lava_decode_peak"  # on SGLang's Req: the peak its admission counted on
_CLIP = int(os.environ.get("SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION", "4096"))  # SGLang's CLIP_MAX_NEW_TOKENS


def decode_config(req):
    """The request's settings when it compresses during decode and generates; else None."""
    try:
        config = request_config(req)
    except Exception:  # an invalid setting was refused on the tokenizer side
        return None
    max_new = getattr(req.sampling_params, "max_new_tokens", None)
    if not (config.enabled and config.decode_budget > 0) or (max_new is not None and max_new <= 0):
        return None
    return config


def peak(config, start: int) -> int:
    """Most private slots a request holds while it generates, from ``start`` held when it begins:
    its first selection comes once it holds ``N + D`` and has generated a window, and every later
    one at ``N + D`` (one slot of packing rounding on top)."""
    return max(start + config.window, config.decode_budget + config.decode_interval) + 1


def start_slots(req, config) -> int:
    """What a request keeps when it begins to generate: its budget when its prompt is compressed
    then (a fresh request's), else its private prompt (a continued conversation: what its row
    holds and its new tokens, no re-selection assumed)."""
    L, P = len(req.full_untruncated_fill_ids), int(getattr(req, "prefix_len", 0) or 0)
    if req.kv.holds_kv:
        return held_by_row(req) + L - P
    if req.kv.req_pool_idx is not None:  # a chunk of a prompt whose row is allocated: P is its shared prefix
        P = int(req.kv.cache_protected_len)
    return _kept_after_prefill(config, P, L, L - P)


def _kept_after_prefill(config, P: int, L: int, private: int) -> int:
    """Private slots kept once a prompt of ``L`` tokens (``P`` shared) is prefilled: its budget
    plus one of packing rounding when it is compressed, else ``private``."""
    return min(private, config.budget + 1) if should_compress(config, P, L) else private


def remaining(req) -> int:
    """SGLang's own reserve: the rest of ``max_new_tokens``, clipped as SGLang clips it."""
    return min(max(int(req.sampling_params.max_new_tokens) - len(req.output_ids), 0), _CLIP)


def reserve(req, holds: int) -> Optional[int]:
    """A new request's output reserve when this admission adds ``holds`` private slots (its
    extend, or one chunk) to what its row holds already: the rest of its peak, at most SGLang's;
    None when it does not compress during decode. Records the peak as promised."""
    config = decode_config(req)
    if config is None:
        return None
    top = peak(config, start_slots(req, config))
    setattr(req, PROMISED, top)
    return min(remaining(req), max(0, top - holds - held_by_row(req)))


def held_now(req) -> int:
    """Private slots of a running request, its next token's included."""
    return private_slots(req, len(req.origin_input_ids) + len(req.output_ids))


def growth(req, since_selection: int) -> Optional[int]:
    """What a running request can still grow to: up to its next selection (``N + D`` held and a
    window generated since the last one, ``since_selection`` steps ago), at most SGLang's reserve."""
    config = decode_config(req)
    if config is None or req.kv.req_pool_idx is None:
        return None
    held = held_now(req)
    top = max(held + max(0, config.window - since_selection), config.decode_budget + config.decode_interval) + 1
    return min(remaining(req), max(0, top - held))


def unclipped_max_new(scheduler, req, config, prefill_slots: int, requested: int) -> Optional[int]:
    """``max_new_tokens`` of a request compressed during decode whose prefill (``prefill_slots``)
    and peak fit the pool: the context length and ``SGLANG_MAX_NEW_TOKENS_LIMIT`` bound it, not
    the pool; None when they do not fit (SGLang's clip stands)."""
    n = len(req.origin_input_ids)
    start = _kept_after_prefill(config, 0, n, prefill_slots)
    if max(prefill_slots, peak(config, start)) + 2 > int(scheduler.max_total_num_tokens):
        return None
    limit = getattr(scheduler, "max_new_tokens_limit", None)
    if limit is not None and limit > 0:
        requested = min(requested, int(limit))
    return max(0, min(requested, int(scheduler.model_config.context_len) - n - 1))


def around_running_offset(original, self, req, *args, **kwargs):
    """``PrefillAdder._get_running_request_total_token_offset``: a decode-compressed request
    reserves its growth under its peak."""
    offset = original(self, req, *args, **kwargs)
    win = _window(req)
    bounded = growth(req, win.since_selection if win is not None else 0)
    return offset if bounded is None else min(offset, bounded)


def around_update_prefill_budget(original, self, prefix_len, extend_input_len, max_new_tokens, *args, **kwargs):
    """``PrefillAdder._update_prefill_budget``: the request just admitted (the last of
    ``can_run_list``, for a whole prompt or a chunk) commits its bounded reserve."""
    if max_new_tokens and self.can_run_list:
        bounded = reserve(self.can_run_list[-1], int(extend_input_len))
        if bounded is not None:
            max_new_tokens = min(max_new_tokens, bounded)
    return original(self, prefix_len, extend_input_len, max_new_tokens, *args, **kwargs)


def _window(req):
    row = req.kv.req_pool_idx
    win = WINDOWS.get(int(row)) if row is not None else None
    return win if win is not None and owns(win, req) else None


HOOKS = [
    (f"{ADDER}._get_running_request_total_token_offset", around_running_offset, "AROUND", True),
    (f"{ADDER}._update_prefill_budget", around_update_prefill_budget, "AROUND", True),
]
