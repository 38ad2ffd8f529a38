"""The SGLang hooks of the engine integration. One list (``hook_specs``), checked at start-up.

Flow of one compressed request (scheduler process):

1. ``TpModelWorker.forward_batch_generation`` (AROUND), extend batch: the first time a request
   is prefilled we decide whether it will be compressed (policy on, it will decode, prompt long
   enough beyond its shared prefix ``P = req.kv.cache_protected_len``). If so it becomes a
   ``PendingRequest`` and ``req.skip_radix_cache_insert`` is set: its private range is never
   published to the radix tree (the radix rule).
2. ``RadixAttention.forward`` (AROUND) copies the post-RoPE queries of the prompt's last ``w``
   positions, in whichever chunk they occur, layer by layer.
3. After the forward of the chunk that completes the prompt, the request is compressed
   (``engine.compress``): kept cells repacked, the rest of its private slots freed at once.
4. Decode batches holding a compressed request run attention through ``engine.decode``.
5. ``BasePrefixCache.free_kv_row`` (AROUND) skips the slots already freed, and
   ``release_kv_cache`` (AROUND) drops the state: release frees exactly what the request holds.
6. A compressed request retracted under memory pressure keeps its selection; its re-prefill
   applies it again and recomputes the generated tokens' attention as decode saw it
   (``engine.replay``), so its output is the same as without pressure.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from lava_sglang.config import CompressionConfig
from lava_sglang.engine.request_params import after_sampling_params_verify, resolve
from lava_sglang.engine.state import REGISTRY, PendingRequest
from lava_sglang.server_args_patch import config_of

logger = logging.getLogger("lava_sglang")

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
WORKER = "sglang.srt.managers.tp_worker.TpModelWorker"
RADIX_ATTENTION = "sglang.srt.layers.radix_attention.RadixAttention"
PREFIX_CACHE = "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache"
RELEASE = "sglang.srt.mem_cache.common.release_kv_cache"
STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
SAMPLING_PARAMS = "sglang.srt.sampling.sampling_params.SamplingParams"
INTERNAL_STATE = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"

META_KEY = "kv_compression"

# The server-wide config of this process (set when the scheduler starts).
_SERVER_CONFIG: Optional[CompressionConfig] = None
# What the current forward is doing; set around the model forward by the worker hook.
_STEP = None
# The scheduler of this process (set when it starts): compression tells it that memory was freed.
_SCHEDULER = None
# Rows examined and not chosen for compression at their first prefill: row -> rid.
_NOT_COMPRESSED: dict[int, str] = {}


def server_config() -> CompressionConfig:
    global _SERVER_CONFIG
    if _SERVER_CONFIG is None:
        _SERVER_CONFIG = config_of(None)
    return _SERVER_CONFIG


def request_config(req) -> CompressionConfig:
    """Server config with the request's ``kv_*`` overrides from ``sampling_params.custom_params``."""
    custom = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    try:
        return resolve(server_config(), custom)
    except ValueError as exc:  # rejected with HTTP 400 before it gets here; never crash the scheduler
        logger.warning("lava-sglang: request %s: ignoring invalid compression settings (%s)", req.rid, exc)
        return server_config()


# --------------------------------------------------------------------------------------------
# scheduler start
# --------------------------------------------------------------------------------------------

def before_scheduler_init(self, server_args, *args, **kwargs):
    """Refuse to start with settings compression cannot run with (one error line, exit 1)."""
    global _SERVER_CONFIG, _SCHEDULER
    config = config_of(server_args)
    _SERVER_CONFIG = config
    _SCHEDULER = self
    from lava_sglang.engine import metrics

    metrics.enable(getattr(server_args, "enable_metrics", False))
    if not config.enabled:
        return None
    from sglang.srt.arg_groups.model_override_base import resolving_view

    from lava_sglang.engine.startup_checks import unsupported_settings

    problems = unsupported_settings(resolving_view(server_args))
    if problems:
        message = f"lava-sglang: --kv-policy {config.policy} cannot run with: " + "; ".join(problems)
        logger.error(message)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(1)
    logger.info("lava-sglang: KV compression %s", config.to_dict())
    return None


def after_get_init_info(result, self, *args, **kwargs):
    """Expose the compression settings in the scheduler's info (merged into ``/server_info``)."""
    result[META_KEY] = config_of(self.server_args).to_dict()
    return result


def after_get_internal_state(result, self, *args, **kwargs):
    """Live compression state in ``/server_info`` -> ``internal_states[i]["kv_compression"]``."""
    from lava_sglang.engine.accounting import snapshot

    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state[META_KEY] = snapshot(self.scheduler)
    return result


# --------------------------------------------------------------------------------------------
# forward: choose, capture, compress, decode
# --------------------------------------------------------------------------------------------

class _ExtendStep:
    """Window rows to capture in this extend forward: (pending, q_lo, q_hi, win_lo); and the
    replayed re-prefills whose generated-token queries are recomputed (``engine.replay``)."""

    def __init__(self, captures, replays=(), req_to_token=None, kv_pool=None):
        self.captures = captures
        self.replays = list(replays)
        self.req_to_token = req_to_token
        self.kv_pool = kv_pool

    def capture(self, layer, q):
        import torch

        Hq, D = layer.tp_q_head_num, layer.qk_head_dim
        rows = q.reshape(-1, Hq, D)
        lid = layer.layer_id
        for pending, q_lo, q_hi, win_lo in self.captures:
            buf = pending.queries
            while len(buf) <= lid:
                buf.append(None)
            if buf[lid] is None:
                buf[lid] = torch.zeros((pending.window, Hq, D), dtype=q.dtype, device=q.device)
            buf[lid][win_lo:win_lo + (q_hi - q_lo)] = rows[q_lo:q_hi]


class _DecodeStep:
    def __init__(self, req_to_token, kv_pool):
        self.req_to_token = req_to_token
        self.kv_pool = kv_pool
        self.plan = None
        self.plan_batch = None

    def plan_for(self, forward_batch, layer):
        from lava_sglang.engine.decode import DecodePlan

        if self.plan is None or self.plan_batch is not forward_batch:
            rows = [int(r) for r in forward_batch.req_pool_indices.tolist()]
            seq_lens = [int(n) for n in forward_batch.seq_lens.tolist()]
            self.plan = DecodePlan(REGISTRY, self.req_to_token, rows, seq_lens, layer.tp_k_head_num)
            self.plan_batch = forward_batch
        return self.plan


def _choose(req, prefix_len_in_row: int) -> Optional[PendingRequest]:
    """Decide at a request's first prefill chunk whether it will be compressed."""
    config = request_config(req)
    if not config.enabled:
        return None
    max_new = getattr(req.sampling_params, "max_new_tokens", None)
    if max_new is not None and max_new <= 0:
        return None  # prefix primers seed shared prefixes: never compressed
    prompt_len = len(req.origin_input_ids)
    P = int(req.kv.cache_protected_len)
    if prompt_len < config.min_prompt_len or prompt_len - P <= config.budget or P > prefix_len_in_row:
        return None
    return PendingRequest(rid=req.rid, row=int(req.kv.req_pool_idx), config=config, prefix_len=P, prompt_len=prompt_len)


def _replay_or_choose(req, prefix_len_in_row: int) -> Optional[PendingRequest]:
    """A request prefilled again after a retraction replays its selection when its shared prefix is
    the one it was compressed with; otherwise (the tree evicted or grew it) it is chosen afresh."""
    saved = REGISTRY.retracted.pop(req.rid, None)
    if saved is not None:
        P = int(req.kv.cache_protected_len)
        if P == saved.prefix_len and len(req.origin_input_ids) == saved.prompt_len and P <= prefix_len_in_row:
            return PendingRequest(rid=req.rid, row=int(req.kv.req_pool_idx), config=saved.config, prefix_len=P,
                                  prompt_len=saved.prompt_len, replay=saved)
        logger.warning("lava-sglang: retracted request %s: shared prefix is now %d tokens (was %d); compressing "
                       "it afresh, its output may differ from a run without retraction", req.rid, P, saved.prefix_len)
    return _choose(req, prefix_len_in_row)


def _prepare_extend(batch) -> tuple[list, list]:
    from lava_sglang.engine.replay import ReplayChunk

    captures, replays = [], []
    offset = 0
    for i, req in enumerate(batch.reqs):
        ext, pre = int(batch.extend_lens[i]), int(batch.prefix_lens[i])
        row = req.kv.req_pool_idx
        chunk_lo, chunk_hi = pre, pre + ext
        if row is not None:
            row = int(row)
            pending = REGISTRY.pending.get(row)
            if pending is not None and pending.rid != req.rid:
                REGISTRY.drop(row)
                pending = None
            if pending is None and _NOT_COMPRESSED.get(row) != req.rid and row not in REGISTRY.compressed:
                pending = _replay_or_choose(req, pre)
                if pending is None:
                    _NOT_COMPRESSED[row] = req.rid
                else:
                    req.skip_radix_cache_insert = True
                    REGISTRY.pending[row] = pending
            if pending is not None and pending.replay is not None:
                if chunk_hi > pending.prompt_len:
                    replays.append(ReplayChunk(pending, offset, chunk_lo, chunk_hi))
            elif pending is not None:
                win_start = pending.prompt_len - pending.window
                lo, hi = max(chunk_lo, win_start), min(chunk_hi, pending.prompt_len)
                if lo < hi:
                    captures.append((pending, offset + lo - chunk_lo, offset + hi - chunk_lo, lo - win_start))
        offset += ext
    return captures, replays


def _memory_freed() -> None:
    """Let the scheduler try to admit again: SGLang marks the running batch full when a prefill
    did not fit and clears the mark only when a request finishes. Compression returns slots at
    once, so without this the freed memory would sit idle until the next request finished."""
    running = getattr(_SCHEDULER, "running_batch", None)
    if running is not None:
        running.batch_is_full = False


def _finish_extend(worker, batch, elapsed: float) -> None:
    from lava_sglang.engine.compress import compress_request

    runner = worker.model_runner
    for i, req in enumerate(batch.reqs):
        row = req.kv.req_pool_idx
        pending = REGISTRY.pending.get(int(row)) if row is not None else None
        if pending is None or pending.rid != req.rid:
            continue
        pending.prefill_seconds += elapsed
        chunk_hi = int(batch.prefix_lens[i]) + int(batch.extend_lens[i])
        if chunk_hi < len(req.full_untruncated_fill_ids):
            continue  # more chunks to come
        del REGISTRY.pending[pending.row]
        if pending.replay is None and (any(q is None for q in pending.queries) or not pending.queries):
            logger.warning("lava-sglang: request %s: window queries missing; not compressed", req.rid)
            continue
        state = compress_request(pending, runner.req_to_token_pool.req_to_token, runner.token_to_kv_pool,
                                 runner.token_to_kv_pool_allocator, prefill_seconds=pending.prefill_seconds)
        if state is None:
            continue
        REGISTRY.compressed[state.row] = state
        _memory_freed()
        totals = REGISTRY.totals
        if pending.replay is not None:
            totals["replayed_requests"] += 1
            state.report["replayed_after_retraction"] = True
        totals["compressed_requests"] += 1
        totals["kept_cells"] += state.report["kept_cells"]
        totals["freed_slots"] += state.report["slots_freed"]
        totals["compression_seconds"] += state.report["compression_ms"] / 1000
        from lava_sglang.engine import metrics

        metrics.record(state.report)
        if req.customized_info is None:
            req.customized_info = {}
        req.customized_info[META_KEY] = [dict(state.report)]
        r = state.report
        logger.info("lava-sglang: compressed %s: policy=%s prompt=%d shared=%d kept_cells=%d slots_held=%d freed=%d "
                    "packing=%.2f %.1f ms (prefill %.1f ms)", req.rid, r["policy"], r["prompt_tokens"],
                    r["shared_prefix_tokens"], r["kept_cells"], r["slots_held"], r["slots_freed"],
                    r["packing_efficiency"], r["compression_ms"], r["prefill_ms"])
        from lava_sglang.engine.accounting import debug_check

        debug_check(worker)


def around_forward_batch_generation(original, self, batch=None, *args, **kwargs):
    global _STEP
    if batch is None or not getattr(batch, "reqs", None) or not server_config().enabled:
        return original(self, batch, *args, **kwargs)
    mode = batch.forward_mode
    if mode.is_decode():
        if not any(REGISTRY.compressed_for(r.kv.req_pool_idx) is not None for r in batch.reqs):
            return original(self, batch, *args, **kwargs)
        _STEP = _DecodeStep(self.model_runner.req_to_token_pool.req_to_token, self.model_runner.token_to_kv_pool)
        try:
            return original(self, batch, *args, **kwargs)
        finally:
            _STEP = None
    if not mode.is_extend():
        return original(self, batch, *args, **kwargs)
    captures, replays = _prepare_extend(batch)
    if not any(REGISTRY.pending.get(int(r.kv.req_pool_idx)) for r in batch.reqs if r.kv.req_pool_idx is not None):
        return original(self, batch, *args, **kwargs)
    runner = self.model_runner
    _STEP = _ExtendStep(captures, replays, runner.req_to_token_pool.req_to_token, runner.token_to_kv_pool)
    started = time.perf_counter()
    try:
        result = original(self, batch, *args, **kwargs)
    finally:
        _STEP = None
    _finish_extend(self, batch, time.perf_counter() - started)
    return result


def around_radix_attention_forward(original, self, q, k, v, forward_batch, *args, **kwargs):
    step = _STEP
    if step is None:
        return original(self, q, k, v, forward_batch, *args, **kwargs)
    if isinstance(step, _DecodeStep) and forward_batch.forward_mode.is_decode():
        from lava_sglang.engine.decode import decode_attention

        save_kv_cache = args[0] if args else kwargs.get("save_kv_cache", True)
        return decode_attention(self, q, k, v, forward_batch, save_kv_cache, step.plan_for(forward_batch, self),
                                step.kv_pool)
    out = original(self, q, k, v, forward_batch, *args, **kwargs)
    if isinstance(step, _ExtendStep) and step.captures:
        step.capture(self, q)
    if isinstance(step, _ExtendStep) and step.replays:
        from lava_sglang.engine.replay import replay_attention

        out = replay_attention(self, q, out, step.replays, step.kv_pool, step.req_to_token)
    return out


# --------------------------------------------------------------------------------------------
# release
# --------------------------------------------------------------------------------------------

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
    was_compressed = state is not None
    if was_compressed and state.rid == rid and _is_retraction(req):
        REGISTRY.remember_retracted(state)
        logger.info("lava-sglang: compressed request %s retracted; its re-prefill will replay its selection", rid)
    try:
        result = original(req, tree_cache, *args, **kwargs)
    finally:
        REGISTRY.drop(row, rid)
        if row is not None and _NOT_COMPRESSED.get(int(row)) == rid:
            del _NOT_COMPRESSED[int(row)]
        if was_compressed:
            REGISTRY.totals["released_requests"] += 1
    from lava_sglang.engine.accounting import after_release

    after_release(tree_cache, row)  # LAVA_SGLANG_DEBUG=1: invariants after every release
    return result


def around_is_request_level_key(original, self, key):
    return key == META_KEY or original(self, key)


def hook_specs():
    """(target, function, hook type, needed only with compression) for each engine hook."""
    return [
        (f"{SCHEDULER}.__init__", before_scheduler_init, "BEFORE", False),
        (f"{SCHEDULER}.get_init_info", after_get_init_info, "AFTER", False),
        (f"{INTERNAL_STATE}.get_internal_state", after_get_internal_state, "AFTER", False),
        (f"{WORKER}.forward_batch_generation", around_forward_batch_generation, "AROUND", True),
        (f"{RADIX_ATTENTION}.forward", around_radix_attention_forward, "AROUND", True),
        (f"{PREFIX_CACHE}.free_kv_row", around_free_kv_row, "AROUND", True),
        (RELEASE, around_release_kv_cache, "AROUND", True),
        (f"{STREAMER}.is_request_level_customized_info_key", around_is_request_level_key, "AROUND", True),
        (f"{SAMPLING_PARAMS}.verify", after_sampling_params_verify, "AFTER", True),
    ]
