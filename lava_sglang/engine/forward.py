"""The forward interception: around the worker's forward of a batch and around every
``RadixAttention.forward``. An extend batch that needs nothing of ours, and a decode batch
without a compressed request, run exactly as in SGLang. Otherwise a step object
(``engine.steps``) says what the attention hook does: capture window queries, attend over a
compressed layout (``engine.layout.attend``: the one path for decode, extend and replay), copy
back a rewound turn's original vectors. An exception inside the attention hook (a kernel or
layout error) fails the requests that read over a compressed layout, and the forward goes on
with SGLang's own backend for everyone else: never the scheduler. No SGLang import at module
level.
"""

from __future__ import annotations

import time

from lava_sglang.engine.cells import pool_cells
from lava_sglang.engine.decode import decode_attention
from lava_sglang.engine.decode_compression import after_decode, capture, step_windows
from lava_sglang.engine.failures import armed, fail_request, inject
from lava_sglang.engine.guard import after_chunk, after_decode_step
from lava_sglang.engine.layout import attend, forget_decode_steps, save_kv
from lava_sglang.engine.prefill import finish_extend, prepare_extend
from lava_sglang.engine.settings import server_config
from lava_sglang.engine.state import REGISTRY
from lava_sglang.engine.steps import DecodeStep
from lava_sglang.kernels.repack import repack_cells

WORKER = "sglang.srt.managers.tp_worker.TpModelWorker"
RADIX_ATTENTION = "sglang.srt.layers.radix_attention.RadixAttention"

# What the current forward is doing; set around the model forward by the worker hook.
_STEP = None


def around_forward_batch_generation(original, self, batch=None, *args, **kwargs):
    global _STEP
    if batch is None or not getattr(batch, "reqs", None) or not server_config().enabled:
        return original(self, batch, *args, **kwargs)
    mode = batch.forward_mode
    runner = self.model_runner
    if mode.is_decode():
        layout = any(REGISTRY.compressed_for(r.kv.req_pool_idx) is not None for r in batch.reqs)
        windows = step_windows(batch)  # requests compressed during decode (engine.decode_compression)
        if not layout and not windows:
            return original(self, batch, *args, **kwargs)
        step = _STEP = DecodeStep(runner.req_to_token_pool.req_to_token, runner.token_to_kv_pool, batch.reqs,
                                  layout=layout, windows=windows)
        try:
            result = original(self, batch, *args, **kwargs)
        finally:
            _STEP = None
        if windows and not getattr(step, "bypass", False):
            after_decode(self, step)
            after_decode_step(step)  # the decode bound, enforced
        return result
    if not mode.is_extend():
        return original(self, batch, *args, **kwargs)
    forget_decode_steps()
    pool = runner.token_to_kv_pool
    step = prepare_extend(batch, runner.req_to_token_pool.req_to_token, pool_cells(pool))
    if step is None:
        result = original(self, batch, *args, **kwargs)
    else:
        step.kv_pool = pool
        step.reqs = list(batch.reqs)
        _STEP = step
        started = time.perf_counter()
        try:
            result = original(self, batch, *args, **kwargs)
        finally:
            _STEP = None
        finish_extend(self, batch, time.perf_counter() - started)
    after_chunk(batch)  # the chunked bound, enforced before the next chunk is allocated
    return result


def around_radix_attention_forward(original, self, q, k, v, forward_batch, *args, **kwargs):
    step = _STEP
    if step is None or getattr(step, "bypass", False):
        return original(self, q, k, v, forward_batch, *args, **kwargs)
    try:
        return _attention(original, self, q, k, v, forward_batch, step, *args, **kwargs)
    except Exception as exc:  # a kernel or layout error: the requests read over a layout fail, not the scheduler
        _fail_compressed(step, exc)
        step.bypass = True  # this and the forward's later layers run the stock backend
        return original(self, q, k, v, forward_batch, *args, **kwargs)


def _fail_compressed(step, exc) -> None:
    """Fail the requests of the forward whose attention runs over a compressed layout (or
    replays one); the others are served by the stock backend, which reads their rows exactly."""
    reqs = step.reqs if isinstance(step, DecodeStep) else getattr(step, "reqs", ())
    for req in reqs:
        row = req.kv.req_pool_idx
        if row is not None and (REGISTRY.compressed_for(row) is not None or int(row) in REGISTRY.pending):
            fail_request(req, "attention", exc)


def _attention(original, self, q, k, v, forward_batch, step, *args, **kwargs):
    save_kv_cache = args[0] if args else kwargs.get("save_kv_cache", True)
    if isinstance(step, DecodeStep):
        if not forward_batch.forward_mode.is_decode():
            return original(self, q, k, v, forward_batch, *args, **kwargs)
        capture(step, self, q)  # the window of the requests compressed during decode
        if not step.layout:  # nothing compressed yet: SGLang's own attention
            return original(self, q, k, v, forward_batch, *args, **kwargs)
        for req in step.reqs if armed() else ():  # tests: a kernel error inside a layer
            if REGISTRY.compressed_for(req.kv.req_pool_idx) is not None:
                inject("attention", req)
        return decode_attention(self, q, k, v, forward_batch, save_kv_cache, step.plan_for(forward_batch, self),
                                step.kv_pool)
    if step.whole_batch:
        if save_kv_cache:
            save_kv(self, k, v, forward_batch.out_cache_loc, step.kv_pool)
        if step.restores:
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


HOOKS = [
    (f"{WORKER}.forward_batch_generation", around_forward_batch_generation, "AROUND", True),
    (f"{RADIX_ATTENTION}.forward", around_radix_attention_forward, "AROUND", True),
]
