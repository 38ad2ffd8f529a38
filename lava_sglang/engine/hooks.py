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
   (``engine.compress``): kept cells of all layers packed into as few slots as they fill (the
   pool is one allocation, ``engine.pool_alloc`` / ``engine.cells``), the rest freed at once.
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
from lava_sglang.engine import parking
from lava_sglang.engine.continuation import after_session_held_tokens, around_release_session
from lava_sglang.engine.pool_alloc import after_create_buffers, around_create_buffers_normal
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

POOL_STATS = "sglang.srt.managers.scheduler_components.pool_stats_observer.SchedulerPoolStatsObserver"
STREAMING_SESSION = "sglang.srt.session.streaming_session.StreamingSession"
MHA_POOL = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool"
RADIX_CACHE = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache"

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
    """What this extend forward does besides the backend's attention: the window rows to
    capture, (pending, q_lo, q_hi, win_lo); and the queries that attend over a compressed
    layout (``engine.layout``). With ``whole_batch`` the plan covers every token of the batch
    (a turn continuing over its compressed cache is in it) and the backend is not run;
    otherwise it holds only replayed generated tokens (``engine.replay``), whose rows of the
    backend's output it overwrites."""

    def __init__(self, captures, plan=None, whole_batch=False, kv_pool=None):
        self.captures = captures
        self.plan = plan
        self.whole_batch = whole_batch
        self.kv_pool = kv_pool
        self.restores = []  # per re-entered row, per layer: (original cells, new cells) (continuation.rewind)

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
        from lava_sglang.engine.cells import pool_cells
        from lava_sglang.engine.decode import decode_plan

        if self.plan is None or self.plan_batch is not forward_batch:
            rows = [int(r) for r in forward_batch.req_pool_indices.tolist()]
            seq_lens = [int(n) for n in forward_batch.seq_lens.tolist()]
            self.plan = decode_plan(REGISTRY, self.req_to_token, rows, seq_lens, pool_cells(self.kv_pool))
            self.plan_batch = forward_batch
        return self.plan


def _choose(req, prefix_len_in_row: int) -> Optional[PendingRequest]:
    """Decide at a request's first prefill chunk whether it will be compressed."""
    config = request_config(req)
    if not config.enabled:
        return None
    max_new = getattr(req.sampling_params, "max_new_tokens", None)
    session = getattr(req, "session", None)
    if max_new is not None and max_new <= 0 and not getattr(session, "streaming", False):
        return None  # prefix primers seed shared prefixes: never compressed (a session's context turn is)
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


def _window_capture(pending, offset: int, chunk_lo: int, chunk_hi: int):
    """The rows of this chunk that fall in ``pending``'s window ``[prompt_len - w, prompt_len)``."""
    win_start = pending.prompt_len - pending.window
    lo, hi = max(chunk_lo, win_start), min(chunk_hi, pending.prompt_len)
    return (pending, offset + lo - chunk_lo, offset + hi - chunk_lo, lo - win_start) if lo < hi else None


def _continued_state(req, chunk_lo: int, req_to_token, space):
    """The compressed state this chunk continues over (a streaming session's row), or None."""
    from lava_sglang.engine.continuation import begin_turn

    row = int(req.kv.req_pool_idx)
    state = REGISTRY.compressed.get(row)
    if state is None:
        return None
    if state.rid != req.rid:
        if state.kv is not req.kv:  # not the session's record: a stale state, never read it
            logger.warning("lava-sglang: row %d: dropping the state of %s (request %s is not its continuation)",
                           row, state.rid, req.rid)
            REGISTRY.drop(row)
            return None
        begin_turn(state, req, request_config(req), len(req.full_untruncated_fill_ids), chunk_lo)
        req.skip_radix_cache_insert = True
    if chunk_lo < state.prompt_len:
        from lava_sglang.engine.continuation import rewind

        rewind(state, chunk_lo, req_to_token, space)
    return state


def _prepare_extend(batch, req_to_token, space):
    """Decide, per request of an extend batch, what this forward does besides the backend:
    choose for compression, capture window queries, continue over a compressed layout, replay.
    Returns the :class:`_ExtendStep`, or None when the batch needs nothing of ours."""
    from lava_sglang.engine.layout import LayoutEntry, LayoutPlan, state_mid, uncompressed_entry
    from lava_sglang.engine.replay import ReplayChunk

    captures, replays, entries, restores = [], [], [], []
    continued = False
    offset = 0
    for i, req in enumerate(batch.reqs):
        ext, pre = int(batch.extend_lens[i]), int(batch.prefix_lens[i])
        row = req.kv.req_pool_idx
        chunk_lo, chunk_hi = pre, pre + ext
        state = _continued_state(req, chunk_lo, req_to_token, space) if row is not None else None
        if state is not None:
            continued = True
            if state.restore is not None:
                restores.append(state.restore)
                state.restore = None
            entries.append(LayoutEntry(state.row, state.prefix_len, state.prompt_len, chunk_hi, ext, offset, state_mid(state)))
            if state.reselect is not None:
                cap = _window_capture(state.reselect, offset, chunk_lo, chunk_hi)
                if cap is not None:
                    captures.append(cap)
            offset += ext
            continue
        pending = None
        if row is not None:
            row = int(row)
            pending = REGISTRY.pending.get(row)
            if pending is not None and pending.rid != req.rid:
                REGISTRY.drop(row)
                pending = None
            if pending is None and _NOT_COMPRESSED.get(row) != req.rid:
                pending = _replay_or_choose(req, pre)
                if pending is None:
                    _NOT_COMPRESSED[row] = req.rid
                else:
                    req.skip_radix_cache_insert = True
                    REGISTRY.pending[row] = pending
        if pending is not None and pending.replay is not None and chunk_hi > pending.prompt_len:
            replays.append(ReplayChunk(pending, offset, chunk_lo, chunk_hi))
            prompt_hi = min(chunk_hi, pending.prompt_len)
            if prompt_hi > chunk_lo:  # the prompt part, read as by the backend (whole-batch plans only)
                entries.append(uncompressed_entry(row, prompt_hi, prompt_hi - chunk_lo, offset))
        else:
            if pending is not None and pending.replay is None:
                cap = _window_capture(pending, offset, chunk_lo, chunk_hi)
                if cap is not None:
                    captures.append(cap)
            if row is not None:
                entries.append(uncompressed_entry(row, chunk_hi, ext, offset))
        offset += ext
    replay_entries = [e for e in (c.layout_entry(req_to_token, space) for c in replays) if e is not None]
    if continued:
        step = _ExtendStep(captures, LayoutPlan(entries + replay_entries, req_to_token, space), whole_batch=True)
        step.restores = restores
        return step
    if not captures and not replay_entries and not any(r.kv.req_pool_idx is not None and
                                                        REGISTRY.pending.get(int(r.kv.req_pool_idx)) for r in batch.reqs):
        return None
    plan = LayoutPlan(replay_entries, req_to_token, space) if replay_entries else None
    return _ExtendStep(captures, plan)


def _memory_freed() -> None:
    """Let the scheduler try to admit again: SGLang marks the running batch full when a prefill
    did not fit and clears the mark only when a request finishes. Compression returns slots at
    once, so without this the freed memory would sit idle until the next request finished."""
    running = getattr(_SCHEDULER, "running_batch", None)
    if running is not None:
        running.batch_is_full = False


def _record(worker, req, report: dict, first: bool) -> None:
    """Totals, metrics, the response's ``meta_info["kv_compression"]``, the log line and the
    debug invariants of one compression (``first``) or re-selection of a continued turn."""
    from lava_sglang.engine import metrics
    from lava_sglang.engine.accounting import debug_check

    _memory_freed()
    totals = REGISTRY.totals
    if first:
        totals["compressed_requests"] += 1
        totals["kept_cells"] += report["kept_cells"]
    totals["freed_slots"] += report["slots_freed"]
    totals["compression_seconds"] += report["compression_ms"] / 1000
    metrics.record(report)
    _attach(req, report)
    r = report
    logger.info("lava-sglang: %s %s: policy=%s prompt=%d shared=%d kept_cells=%d slots_held=%d freed=%d "
                "packing=%.2f %.1f ms (prefill %.1f ms)%s", "compressed" if first else "re-selected", req.rid,
                r["policy"], r["prompt_tokens"], r["shared_prefix_tokens"], r["kept_cells"], r["slots_held"],
                r["slots_freed"], r["packing_efficiency"], r["compression_ms"], r["prefill_ms"],
                "" if first else f" turn {r.get('turn')}, earlier kept cells dropped {r.get('earlier_kept_cells_dropped')}")
    debug_check(worker)


def _attach(req, report: dict) -> None:
    if req.customized_info is None:
        req.customized_info = {}
    req.customized_info[META_KEY] = [dict(report)]


def _finish_continued(worker, req, state, chunk_lo: int, chunk_hi: int, elapsed: float) -> None:
    """After a forward of a turn that continues over ``state``: once its prompt is complete,
    re-select the history (``engine.continuation``) and report the turn."""
    from lava_sglang.engine.continuation import reselect

    pend = state.reselect
    if pend is not None:
        pend.prefill_seconds += elapsed
    if chunk_hi < len(req.full_untruncated_fill_ids):
        return  # more chunks to come
    if pend is None or pend.prompt_len != chunk_hi:
        state.reselect = None
        if not (req.customized_info or {}).get(META_KEY):  # a turn too short to re-select, or a re-admission
            _attach(req, dict(state.report, turn=state.turns, continued=True, reselected=False))
        return
    if any(q is None for q in pend.queries) or len(pend.queries) != len(state.mid_cells):
        logger.warning("lava-sglang: request %s: window queries missing; history not re-selected", req.rid)
        state.reselect = None
        return
    runner = worker.model_runner
    report = reselect(state, runner.req_to_token_pool.req_to_token, runner.token_to_kv_pool,
                      runner.token_to_kv_pool_allocator, prefill_seconds=pend.prefill_seconds)
    if report is None:
        _attach(req, dict(state.report, turn=state.turns, continued=True, reselected=False))
        return
    _record(worker, req, report, first=False)


def _finish_extend(worker, batch, elapsed: float) -> None:
    from lava_sglang.engine.compress import compress_request

    runner = worker.model_runner
    for i, req in enumerate(batch.reqs):
        row = req.kv.req_pool_idx
        if row is None:
            continue
        chunk_lo = int(batch.prefix_lens[i])
        chunk_hi = chunk_lo + int(batch.extend_lens[i])
        state = REGISTRY.compressed.get(int(row))
        if state is not None and state.rid == req.rid:
            _finish_continued(worker, req, state, chunk_lo, chunk_hi, elapsed)
            continue
        pending = REGISTRY.pending.get(int(row))
        if pending is None or pending.rid != req.rid:
            continue
        pending.prefill_seconds += elapsed
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
        state.kv = req.kv
        state.report["turn"] = 1
        REGISTRY.compressed[state.row] = state
        if pending.replay is not None:
            REGISTRY.totals["replayed_requests"] += 1
            state.report["replayed_after_retraction"] = True
        _record(worker, req, state.report, first=True)


def around_forward_batch_generation(original, self, batch=None, *args, **kwargs):
    global _STEP
    if batch is None or not getattr(batch, "reqs", None) or not server_config().enabled:
        return original(self, batch, *args, **kwargs)
    mode = batch.forward_mode
    runner = self.model_runner
    if mode.is_decode():
        if not any(REGISTRY.compressed_for(r.kv.req_pool_idx) is not None for r in batch.reqs):
            return original(self, batch, *args, **kwargs)
        _STEP = _DecodeStep(runner.req_to_token_pool.req_to_token, runner.token_to_kv_pool)
        try:
            return original(self, batch, *args, **kwargs)
        finally:
            _STEP = None
    if not mode.is_extend():
        return original(self, batch, *args, **kwargs)
    from lava_sglang.engine.layout import forget_decode_steps

    forget_decode_steps()
    pool = runner.token_to_kv_pool
    from lava_sglang.engine.cells import pool_cells

    step = _prepare_extend(batch, runner.req_to_token_pool.req_to_token, pool_cells(pool))
    if step is None:
        return original(self, batch, *args, **kwargs)
    step.kv_pool = pool
    _STEP = step
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
    from lava_sglang.engine.layout import attend, save_kv

    save_kv_cache = args[0] if args else kwargs.get("save_kv_cache", True)
    if isinstance(step, _DecodeStep):
        if not forward_batch.forward_mode.is_decode():
            return original(self, q, k, v, forward_batch, *args, **kwargs)
        from lava_sglang.engine.decode import decode_attention

        return decode_attention(self, q, k, v, forward_batch, save_kv_cache, step.plan_for(forward_batch, self),
                                step.kv_pool)
    if step.whole_batch:
        if save_kv_cache:
            save_kv(self, k, v, forward_batch.out_cache_loc, step.kv_pool)
        if step.restores:
            from lava_sglang.kernels.repack import repack_cells

            space = step.plan.space
            for restore in step.restores:
                src, dst = restore[self.layer_id]
                repack_cells(space.k_flat, space.v_flat, src, dst)
        n_tokens = q.reshape(-1, self.tp_q_head_num * self.qk_head_dim).shape[0]
        if step.plan.n_tokens != n_tokens:
            raise RuntimeError(f"lava-sglang: the layout plan covers {step.plan.n_tokens} of {n_tokens} extend tokens")
        out = attend(self, q, step.plan, step.kv_pool)
    else:
        out = original(self, q, k, v, forward_batch, *args, **kwargs)
        if step.plan is not None:
            out = attend(self, q, step.plan, step.kv_pool, out)
    if step.captures:
        step.capture(self, q)
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
    from lava_sglang.engine.continuation import session_records

    row, rid = req.kv.req_pool_idx, req.rid
    state = REGISTRY.compressed_for(row)
    was_compressed = state is not None
    if was_compressed and state.rid == rid and _is_retraction(req):
        REGISTRY.remember_retracted(state)
        if state.turns > 1:
            # SGLang frees a retracted session turn's row and prefills the whole history again; the
            # history's keys are then computed over the full context, not over the compressed one
            # the conversation had, so the replayed selection cannot make the output exact.
            logger.warning("lava-sglang: continued turn %s (turn %d) retracted; its re-prefill recomputes the history "
                           "over the full context and replays the selection: its output may differ from a run "
                           "without retraction", rid, state.turns)
        else:
            logger.info("lava-sglang: compressed request %s retracted; its re-prefill will replay its selection", rid)
    kept = False
    try:
        result = original(req, tree_cache, *args, **kwargs)
        # A streaming session kept the row (a finished or retracted turn): the compressed state
        # stays with it for the next turn (engine.continuation); nothing was freed.
        kept = row is not None and int(row) in session_records(tree_cache)
    finally:
        if kept:
            REGISTRY.retracted.pop(rid, None)
            REGISTRY.pending.pop(int(row), None)
        else:
            REGISTRY.drop(row)  # the row is free now: any state on it is stale
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
        (f"{POOL_STATS}.session_held_tokens", after_session_held_tokens, "AFTER", True),
        (f"{STREAMING_SESSION}.release_session", around_release_session, "AROUND", True),
        (f"{MHA_POOL}._create_buffers_normal", around_create_buffers_normal, "AROUND", True),
        (f"{MHA_POOL}._create_buffers", after_create_buffers, "AFTER", True),
        # parked conversations (engine.parking)
        (f"{STREAMING_SESSION}.try_match_prefix", parking.around_try_match_prefix, "AROUND", True),
        (f"{RADIX_CACHE}.claim_kv_row", parking.around_claim_kv_row, "AROUND", True),
        (f"{RADIX_CACHE}.session_records", parking.after_session_records, "AFTER", True),
        (f"{RADIX_CACHE}.evictable_size", parking.after_evictable_size, "AFTER", True),
        (f"{RADIX_CACHE}.evict", parking.around_evict, "AROUND", True),
        (f"{RADIX_CACHE}.evict_for_alloc", parking.around_evict_for_alloc, "AROUND", True),
        (f"{RADIX_CACHE}.reset", parking.after_reset, "AFTER", True),
        (f"{SCHEDULER}._release_aborted_request", parking.after_release_aborted_request, "AFTER", True),
    ]
