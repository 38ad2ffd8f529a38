"""Compression during decode: a request's generated tokens are the newest chunk of its history.

A request with ``kv_decode_budget N > 0`` (``--kv-decode-budget``) and ``kv_decode_interval D``:

1. Every decode step, the attention hook copies the query of its new token in every layer into a
   ring buffer of the last ``w`` (``kv_window``) generated tokens (:class:`DecodeWindow`).
2. After the step, once its private history (the kept cells of a compressed prompt, or the
   private prompt of an uncompressed one, plus the tokens generated since) holds ``N + D``
   slots and at least ``w`` tokens were generated since the last selection, the history is
   selected to ``N`` with that window: ``continuation.reselect`` for a compressed row, the first
   compression (``compress.compress_request``) for one that was not; both end in
   ``compress.select_and_pack``, the one selection. Later steps attend over the new layout.
3. So the request never holds more than ``max(kv_budget, N) + D + 1`` private slots, however long
   it generates. Positions stay logical: a kept token keeps its position, new tokens continue at
   the request's own. The shared prefix is never scored, counted or freed.

Every selection is counted where it happens (``report.count_selection``) and the request's report
carries ``decode_selections``, ``decode_peak_slots``, ``decode_compression_ms_total`` and
``decode_slots_freed_total``. A request selected during decode is never replayed after a
retraction (``engine.release``): its re-prefill is compressed afresh, chunk by chunk where the
server has chunked prefill. Admission reserves the bound, not the whole output
(``engine.decode_admission``), and ``engine.guard`` enforces it. ``kv_min_prompt_len`` does not
delay a decode selection: the decode budget is the bound. No SGLang import at module level.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from lava_sglang.engine.accounting import debug_check
from lava_sglang.engine.compress import compress_request
from lava_sglang.engine.continuation import reselect
from lava_sglang.engine.failures import fail_request, inject
from lava_sglang.engine.layout import forget_decode_steps
from lava_sglang.engine.report import attach, count_selection
from lava_sglang.engine.settings import request_config, should_compress
from lava_sglang.engine.state import REGISTRY, PendingRequest, owner_ref, owns

logger = logging.getLogger("lava_sglang")


@dataclass
class DecodeWindow:
    """The queries of a request's last ``window`` generated tokens, per layer ``[w, Hq, D]``,
    at slot ``position % w``."""

    owner: Optional[weakref.ref]
    window: int
    queries: dict = field(default_factory=dict)  # layer id -> [w, Hq, D]
    since_selection: int = 0  # decode steps since its last selection (or since it began decoding)
    peak_slots: int = 0  # most private slots held while generating (before any state existed)

    def capture(self, layer_id: int, q_row: torch.Tensor, position: int) -> None:
        buf = self.queries.get(layer_id)
        if buf is None:
            buf = self.queries[layer_id] = torch.zeros((self.window, *q_row.shape), dtype=q_row.dtype,
                                                       device=q_row.device)
        buf[position % self.window] = q_row

    def ordered(self, end: int) -> list:
        """Per layer, the queries of positions ``[end - w, end)`` in order."""
        order = torch.arange(end - self.window, end) % self.window
        return [self.queries[layer][order.to(self.queries[layer].device)] for layer in sorted(self.queries)]


WINDOWS: dict[int, DecodeWindow] = {}  # row -> the window of the request decoding on it


def window_for(req) -> Optional[DecodeWindow]:
    """The request's ring buffer (made on its first decode step), or None when it does not
    compress during decode."""
    config = request_config(req)
    if not (config.enabled and config.decode_budget > 0) or req.kv.req_pool_idx is None:
        return None
    row = int(req.kv.req_pool_idx)
    win = WINDOWS.get(row)
    if win is None or not owns(win, req):
        win = WINDOWS[row] = DecodeWindow(owner_ref(req), config.window)
    return win


def forget(row) -> None:
    if row is not None:
        WINDOWS.pop(int(row), None)


def step_windows(batch) -> list:
    """``(batch index, window, position of its new token)`` of each request of a decode batch
    that compresses during decode (positions from the batch's host copy of its lengths)."""
    out = [(i, win) for i, win in enumerate(window_for(req) for req in batch.reqs) if win is not None]
    if not out:
        return out
    lens = getattr(batch, "seq_lens_cpu", None)
    if isinstance(lens, torch.Tensor) and lens.device.type == "cpu" and lens.shape[0] == len(batch.reqs):
        lens = lens.tolist()
    else:
        lens = [req.seqlen for req in batch.reqs]
    return [(i, win, int(lens[i]) - 1) for i, win in out]


def capture(step, layer, q: torch.Tensor) -> None:
    """In the attention hook of a decode step: each decode-compressed request's query."""
    if not step.windows:
        return
    q = q.reshape(q.shape[0], layer.tp_q_head_num, layer.qk_head_dim)
    for i, win, position in step.windows:
        win.capture(layer.layer_id, q[i], position)


def after_decode(worker, step) -> None:
    """After a decode forward: count each decode-compressed request's new token, and select the
    histories that reached their interval."""
    runner = worker.model_runner
    for i, win, position in step.windows:
        req = step.reqs[i]
        end = position + 1  # tokens with keys and values in the row, this step's included
        win.since_selection += 1
        state = REGISTRY.compressed_for(req.kv.req_pool_idx)
        config = request_config(req)
        prefix = state.prefix_len if state is not None else int(req.kv.cache_protected_len)
        held = state.kept_slots + end - state.prompt_len if state is not None else end - prefix
        if state is not None:
            state.decode_peak_slots = max(state.decode_peak_slots, held)
        else:
            win.peak_slots = max(win.peak_slots, held)
        N, D, w = config.decode_budget, config.decode_interval, config.window
        if held < N + D or win.since_selection < w:
            continue
        target = dataclasses.replace(config, budget=N, min_prompt_len=0)  # the decode budget is the bound
        if state is None and not should_compress(target, prefix, end):
            continue
        try:
            inject("decode_select", req)
            _select(runner, req, win, state, target, prefix, end, held)
        except Exception as exc:  # the request fails alone; its layout is as before
            fail_request(req, "decode_select", exc)
            continue
        win.since_selection = 0
        debug_check(worker)


def _select(runner, req, win: DecodeWindow, state, target, prefix: int, end: int, held: int) -> None:
    started = time.perf_counter()
    row = int(req.kv.req_pool_idx)
    req_to_token, pool, allocator = runner.req_to_token_pool.req_to_token, runner.token_to_kv_pool, \
        runner.token_to_kv_pool_allocator
    pend = PendingRequest(rid=req.rid, row=row, config=target, prefix_len=prefix, prompt_len=end, owner=owner_ref(req))
    pend.queries = win.ordered(end)
    if state is None:  # the prompt was not compressed: this is the request's first selection
        state = compress_request(pend, req_to_token, pool, allocator)
        if state is None:
            return
        state.kv, state.owner = req.kv, owner_ref(req)
        state.report["turn"] = 1
        state.decode_peak_slots = win.peak_slots
        REGISTRY.compressed[row] = state
        REGISTRY.not_compressed.pop(row, None)
        req.skip_radix_cache_insert = True  # a compressed row is never published to the tree
        selection = state.report
    else:
        state.reselect = pend
        selection = reselect(state, req_to_token, pool, allocator, decode=True)
        if selection is None:
            return
    forget_decode_steps()  # the next step builds its layout afresh
    state.decode_selections += 1
    state.decode_compression_s += time.perf_counter() - started
    state.decode_freed += selection["slots_freed"]
    count_selection(selection)
    kept = state.kept_slots
    state.report.update(decode_selections=state.decode_selections, decode_peak_slots=state.decode_peak_slots,
                        decode_compression_ms_total=round(state.decode_compression_s * 1000, 2),
                        decode_slots_freed_total=state.decode_freed, decode_private_slots=kept)
    attach(req, state.report)
    logger.info("lava-sglang: decode-selected %s at %d tokens: policy=%s budget=%d private slots %d -> %d, freed %d, "
                "%.1f ms (selection %d, peak %d)", req.rid, end, target.policy, target.budget, held, kept,
                selection["slots_freed"], selection["compression_ms"], state.decode_selections, state.decode_peak_slots)
