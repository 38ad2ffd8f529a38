"""Compression during chunked prefill (``--kv-prefill-compression chunked``, per request
``kv_prefill_compression``).

Under ``after`` a request is compressed once its whole prompt is prefilled, so while it is
prefilled it holds one slot per prompt token. Under ``chunked`` every prefill chunk of
SGLang's chunked prefill (``--chunked-prefill-size``) is treated as a turn of a conversation
(``engine.continuation``): after the chunk, the request's private range so far (the cells kept
so far and the chunk's new tokens) is re-selected with the chunk's last ``window`` queries as
the window, packed and the rest freed at once, and the next chunk attends over the compressed
layout through the same extend path as a continued turn. The first selection of a request is
the ordinary first compression (``engine.compress``) of the range prefilled so far.

Which window a chunk captures (:func:`chunk_target`), for a chunk ``[lo, hi)`` of a prompt
ending at ``end``:

* the chunk that holds part of the prompt's own last window (``hi > end - window``) captures
  that part, and the selection after the last chunk uses the prompt's own window: the final
  selection is as query-aware as under ``after``;
* a chunk shorter than the window is appended without re-selection;
* any other chunk captures its own last ``window`` queries and is re-selected after its
  forward, when the private range exceeds the budget.

So a request's private slots while it is prefilled stay within ``budget + chunk + window``
(plus packing rounding), with ``budget`` the working budget (``kv_prefill_working_budget``, the
budget by default) that the selections before the last keep (:func:`selection_config`); :func:`note_peak` measures it (``peak_slots`` in the report). The
shared prefix (a radix hit) stays uncompressed and outside the budget, as under ``after``.
No SGLang import.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from lava_sglang.config import CompressionConfig


def peak_bound(budget: int, window: int, chunk: int) -> int:
    """What a chunked request's private slots can reach while it is prefilled: its budget, one
    chunk, a window (a last chunk shorter than a full one) and one slot of packing rounding."""
    return budget + chunk + window + 1


def selection_config(config: CompressionConfig, final: bool) -> CompressionConfig:
    """The settings of a chunked selection: a selection before the prompt is complete keeps the
    working budget (``kv_prefill_working_budget``), the last one the budget."""
    if final or config.working_budget == config.budget:
        return config
    return dataclasses.replace(config, budget=config.working_budget)


def is_chunked(config: Optional[CompressionConfig]) -> bool:
    return config is not None and config.enabled and config.prefill_compression == "chunked"


def not_chunkwise(config: CompressionConfig, chunk: int, max_new_tokens: Optional[int], session: bool,
                  start: int = 0) -> Optional[str]:
    """Why a request configured ``chunked`` would not be selected after every full chunk (None:
    it will be). Only such a request is held to :func:`peak_bound`, so only it may be admitted
    on it (``engine.long_prompts``): a prefix primer is never compressed, a window longer than
    the chunk makes every chunk a short one (:func:`chunk_target`), and the chunks before
    ``kv_min_prompt_len`` are never selected (``policies.base.needs_compression``): its first
    chunk ends at ``start + chunk`` (``start``: what its row holds already, a session's history)."""
    if not is_chunked(config):
        return "it is not compressed during chunked prefill"
    if chunk <= 0:
        return "the server has no chunked prefill (--chunked-prefill-size)"
    if max_new_tokens is not None and max_new_tokens <= 0 and not session:
        return "max_new_tokens 0: a prefix primer is never compressed"
    if config.window > chunk:
        return f"kv_window {config.window} is longer than the chunk {chunk}: no chunk is selected before the last"
    if config.min_prompt_len > start + chunk:
        return (f"kv_min_prompt_len {config.min_prompt_len} is longer than the chunk {chunk}: the chunks before it "
                "are never selected")
    return None


def next_chunk_overflow(bound: int, private_now: int, chunk: int, remaining: int) -> bool:
    """Whether the next chunk (at most ``chunk`` of the ``remaining`` prompt tokens) would take a
    request holding ``private_now`` private slots past its ``bound``."""
    return remaining > 0 and private_now + min(chunk, remaining) > bound


def chunk_target(config: CompressionConfig, lo: int, hi: int, end: int) -> Optional[int]:
    """Where the selection that chunk ``[lo, hi)`` feeds ends: ``hi`` (re-select after this
    chunk with its own window), ``end`` (the prompt's own window, selected after the last chunk)
    or None (a short chunk, appended)."""
    w = config.window
    if hi > end - w:
        return end
    if hi - lo < w:
        return None
    return hi


def begin_tally(state, peak_slots: int = 0, prefill_seconds: float = 0.0, trace: Optional[list] = None) -> None:
    """A turn compressed chunk by chunk starts its tally on ``state`` (a ``CompressedRequest``)."""
    state.chunk_selections, state.peak_slots, state.prefill_trace = 0, peak_slots, list(trace or [])
    state.chunk_compression_s, state.chunk_prefill_s, state.chunk_freed = 0.0, prefill_seconds, 0
    state.chunk_mid_prompt = False


def tally_selection(state, report: dict, mid_prompt: bool = False) -> None:
    """One selection of the turn (after a chunk, ``mid_prompt``, or the last): its time and
    freed slots."""
    state.chunk_mid_prompt = state.chunk_mid_prompt or mid_prompt
    state.chunk_selections += 1
    state.chunk_compression_s += report["compression_ms"] / 1000
    state.chunk_freed += report["slots_freed"]


def chunk_report(state) -> dict:
    """What a turn compressed chunk by chunk adds to its report: every selection's cost and
    freed slots summed (``compression_ms`` and ``slots_freed`` are its last selection's), the
    prefill time of all its chunks, the peak and the trace (:func:`note_peak`)."""
    return {"prefill_compression": "chunked", "chunk_selections": state.chunk_selections,
            "peak_slots": state.peak_slots, "prefill_trace": [list(step) for step in state.prefill_trace],
            "compression_ms_total": round(state.chunk_compression_s * 1000, 2),
            "prefill_ms_total": round(state.chunk_prefill_s * 1000, 2), "slots_freed_total": state.chunk_freed}


def note_peak(holder, private_slots: int, prefilled: int) -> None:
    """After a chunk's forward, before its selection frees any: the slots the request's row owns
    past its shared prefix, a candidate peak and a step of its ``prefill_trace``
    (``[tokens prefilled, private slots after the forward, private slots after the selection]``)."""
    holder.peak_slots = max(int(holder.peak_slots or 0), int(private_slots))
    holder.prefill_trace.append([int(prefilled), int(private_slots), int(private_slots)])


def note_kept(holder, private_slots: int) -> None:
    """The private slots the row owns after the selection that followed the last chunk."""
    if holder.prefill_trace:
        holder.prefill_trace[-1][2] = int(private_slots)
