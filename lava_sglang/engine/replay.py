"""Exact re-prefill of a retracted compressed request.

When SGLang retracts a decoding request it frees the request's KV and later prefills it again:
the prompt and the tokens generated so far, in one go. Done naively, the generated tokens would
then attend to the whole prompt, although during decode they only saw the shared prefix, the
cells the policy kept and the earlier generated tokens: the KV of the generated tokens and the
next sampled token would differ from a run without memory pressure.

The replay keeps them identical. The prompt part of the re-prefill is unchanged (causal
attention: prompt positions never see generated ones), so its keys are the ones the request was
compressed from, and the selection it had (``RetractedRequest.keep``) is applied again. In the
re-prefill forward, every query at a position ``>= L`` (a generated token) is recomputed with
the decode-time visibility: in layer ``l``, KV head ``h`` it sees ``[0, P)``, the positions
``keep[l][h]`` of ``[P, L)`` and ``[L, q]``. That is a :class:`~lava_sglang.engine.layout.LayoutEntry`
whose kept cells are still at their prompt positions (not repacked yet), run through the same
:func:`~lava_sglang.engine.layout.attend` as decode and extend, after the backend's own extend
attention (whose rows for those queries it overwrites). Tested on CPU
(tests/test_replay.py, tests/test_reliability.py); the CUDA kernels behind ``attend`` are
tested on their own (tests/test_kernels_*.py), never inside this path on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lava_sglang.engine.layout import LayoutEntry, positions_mid


@dataclass
class ReplayChunk:
    """One replayed request in one extend forward."""

    pending: object  # PendingRequest with ``replay`` set
    token_offset: int  # first row of this request in the batch's flattened extend tokens
    chunk_lo: int  # row position of that first token
    chunk_hi: int  # one past the row position of its last token

    def layout_entry(self, req_to_token: torch.Tensor, space) -> Optional[LayoutEntry]:
        """The generated-token queries of this chunk over their decode-time layout (None: none here)."""
        p = self.pending
        P, L = p.prefix_len, p.prompt_len
        lo = max(self.chunk_lo, L)
        if lo >= self.chunk_hi:
            return None
        row_slots = req_to_token[p.row, :L].to(torch.long)
        return LayoutEntry(p.row, P, L, self.chunk_hi, self.chunk_hi - lo, self.token_offset + lo - self.chunk_lo,
                           positions_mid(p.replay.keep, row_slots, space))
