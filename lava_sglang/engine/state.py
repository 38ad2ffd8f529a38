"""Per-request compression state inside the scheduler process, keyed by ``req_to_token`` row.

A request goes through two states:

* :class:`PendingRequest` from its first prefill chunk (when it was chosen for compression)
  until its prompt is fully prefilled: it collects the window queries layer by layer.
* :class:`CompressedRequest` from compression until release: the layout of what it keeps
  (``docs/design.md``, "Memory layout"): shared prefix ``row[0:P]`` untouched, kept cells packed into the
  slots ``row[P:P+K]``, slots ``row[P+K:L]`` returned to the allocator, decode tokens at
  ``row[L:]``.

A streaming session keeps the row (and so the CompressedRequest) after its turn finishes; the
next turn continues over it (``engine.continuation``) and ``rid`` follows the running turn.

A compressed request that SGLang retracts (decode ran out of KV memory) loses its slots and is
prefilled again later, prompt and generated tokens together. Its selection is kept as a
:class:`RetractedRequest` (keyed by request id: the row changes) so the re-prefill can replay
it exactly (``engine.replay``): same kept positions, and the generated tokens attend to what
they attended to during decode.

The registry is the one place that knows which rows are compressed; release, decode and the
debug invariant checks all read it.
"""

from __future__ import annotations

import collections
import threading
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from lava_sglang.config import CompressionConfig


@dataclass
class PendingRequest:
    rid: str
    row: int
    config: CompressionConfig
    prefix_len: int  # P: tree-owned shared prefix, never compressed
    prompt_len: int  # L: the prompt (origin input ids); [P, L) is compressed
    # Post-RoPE queries of prompt positions [L - w, L), per layer [w, Hq, D]; filled across chunks.
    queries: list = field(default_factory=list)
    prefill_seconds: float = 0.0  # forward time of the batches that prefilled it (shared with their other requests)
    # Re-prefill after a retraction: the selection to apply again instead of scoring.
    replay: Optional["RetractedRequest"] = None
    # The SGLang request this state serves (``owns``): a rid is the client's label, and a
    # client may reuse it, so "the same request" is decided by identity, never by rid.
    owner: Optional[weakref.ref] = None
    # Most private slots held after a chunk, and each chunk's step (engine.chunked.note_peak).
    peak_slots: int = 0
    prefill_trace: list = field(default_factory=list)

    @property
    def window(self) -> int:
        return self.config.window


@dataclass
class CompressedRequest:
    rid: str
    row: int
    config: CompressionConfig
    prefix_len: int  # P
    prompt_len: int  # L
    kept_slots: int  # K: slots row[P:P+K] hold the packed kept cells of every layer
    mid_cells: list  # per layer: int64 cell ids (head-major) of the kept cells in the flat view
    mid_lens: torch.Tensor  # [n_layers, Hkv] int64: kept cells per (layer, head)
    report: dict  # what the response's meta_info shows
    keep: list = field(default_factory=list)  # per layer, per KV head: kept row positions in [P, L)
    # Conversations (engine.continuation): the turn this state serves (1 = the compressed one),
    # SGLang's KV record of the row (a streaming session keeps it across turns), and the
    # window of the running turn while it is prefilled (a PendingRequest whose prompt_len is
    # the turn's end), from which the history is re-selected.
    turns: int = 1
    kv: object = None
    reselect: Optional["PendingRequest"] = None
    # After a rewind (continuation.rewind), for the next extend forward only: per layer
    # (original cells, new cells) of the re-extended positions.
    restore: Optional[list] = None
    owner: Optional[weakref.ref] = None  # the request the state serves now (``owns``)
    # Compression during chunked prefill (engine.chunked): the running turn's tally (selections,
    # the most private slots its row held after a chunk, seconds of selection and of prefill,
    # slots freed).
    chunk_selections: int = 0
    peak_slots: int = 0
    chunk_compression_s: float = 0.0
    chunk_prefill_s: float = 0.0
    chunk_freed: int = 0
    chunk_mid_prompt: bool = False  # a selection before the prompt was complete
    prefill_trace: list = field(default_factory=list)
    # Compression during decode (engine.decode_compression): selections made while generating,
    # the most private slots held while generating, their seconds and freed slots.
    decode_selections: int = 0
    decode_peak_slots: int = 0
    decode_compression_s: float = 0.0
    decode_freed: int = 0

    @property
    def freed_range(self) -> tuple[int, int]:
        """Row positions whose slots went back to the allocator at compression."""
        return self.prefix_len + self.kept_slots, self.prompt_len


@dataclass
class RetractedRequest:
    """The selection of a compressed request that was retracted, for its re-prefill."""

    rid: str
    config: CompressionConfig
    prefix_len: int
    prompt_len: int
    keep: list
    owner: Optional[weakref.ref] = None


def owner_ref(req) -> Optional[weakref.ref]:
    try:
        return weakref.ref(req)
    except TypeError:  # not weak-referenceable (never an SGLang Req)
        return None


def owns(state, req) -> bool:
    """Whether ``state`` (pending, compressed or retracted) serves the request object ``req``."""
    ref = getattr(state, "owner", None)
    return ref is not None and ref() is req


class Registry:
    """All compression state of one scheduler process."""

    def __init__(self):
        self.pending: dict[int, PendingRequest] = {}
        self.compressed: dict[int, CompressedRequest] = {}
        # rid -> selection of a retracted compressed request awaiting its re-prefill (bounded:
        # a request aborted while waiting never comes back for its entry).
        self.retracted: "collections.OrderedDict[str, RetractedRequest]" = collections.OrderedDict()
        self.lock = threading.Lock()
        self.scheduler = None  # this process's Scheduler (set when it starts; engine.startup)
        # Rows examined at their first prefill and not chosen for compression: row -> request (weak).
        self.not_compressed: dict = {}
        # The same events as /metrics' sglang:lava_* series (engine.report, engine.metrics).
        self.totals = {"compressed_requests": 0, "selections": 0, "kept_cells": 0, "freed_slots": 0,
                       "compression_seconds": 0.0,
                       "released_requests": 0, "retracted_requests": 0, "replayed_requests": 0,
                       "continued_turns": 0, "reselections": 0, "earlier_kept_cells_dropped": 0,
                       "continued_prefill_tokens": 0}

    def compressed_for(self, row: Optional[int]) -> Optional[CompressedRequest]:
        return None if row is None else self.compressed.get(int(row))

    def examined_not_compressed(self, row: int, req) -> bool:
        ref = self.not_compressed.get(row)
        return ref is not None and ref() is req

    def remember_retracted(self, state: CompressedRequest, limit: int = 4096) -> None:
        self.retracted[state.rid] = RetractedRequest(state.rid, state.config, state.prefix_len, state.prompt_len,
                                                     state.keep, owner=state.owner)
        while len(self.retracted) > limit:
            self.retracted.popitem(last=False)
        self.totals["retracted_requests"] += 1

    def drop(self, row: Optional[int], rid: Optional[str] = None) -> None:
        if row is None:
            return
        row = int(row)
        for table in (self.pending, self.compressed):
            state = table.get(row)
            if state is not None and (rid is None or state.rid == rid):
                del table[row]


REGISTRY = Registry()


def private_slots(req, hi: int) -> int:
    """The slots ``req``'s row owns past its shared prefix once ``hi`` tokens are in it (a
    compressed row: its kept slots and what came after its last selection)."""
    row = int(req.kv.req_pool_idx)
    state = REGISTRY.compressed.get(row)
    if state is not None and owns(state, req):
        return int(state.kept_slots) + max(0, hi - int(state.prompt_len))
    pending = REGISTRY.pending.get(row)
    P = pending.prefix_len if pending is not None and owns(pending, req) else int(req.kv.cache_protected_len)
    return hi - int(P)


def held_by_row(req) -> int:
    """Private slots the request's row holds before it is admitted: a session's or a parked
    conversation's compressed history that this turn continues (allocated, not admitted again)."""
    row = req.kv.req_pool_idx
    state = REGISTRY.compressed.get(int(row)) if row is not None else None
    return state.kept_slots if state is not None and state.kv is req.kv else 0
