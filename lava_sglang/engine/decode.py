"""Decode attention for batches that hold compressed requests (``docs/design.md``, "Decode index").

Every request of the batch is one :class:`~lava_sglang.engine.layout.LayoutEntry` with one
query: a compressed request reads its shared prefix ``row[0:P]``, its kept cells of the layer
and the tokens appended since compression ``row[L:seq_len]``; an uncompressed one reads
``row[0:seq_len]``. The plan is built once per forward and shared by all layers; the
attention is :func:`lava_sglang.engine.layout.attend` (the same path as extend and replay).
"""

from __future__ import annotations

import torch

from lava_sglang.engine.layout import LayoutEntry, LayoutPlan, attend, save_kv, state_mid, uncompressed_entry
from lava_sglang.engine.state import Registry


def decode_plan(registry: Registry, req_to_token: torch.Tensor, rows: list[int], seq_lens: list[int],
                space) -> LayoutPlan:
    entries = []
    for i, (row, seq_len) in enumerate(zip(rows, seq_lens)):
        state = registry.compressed_for(row)
        if state is None:
            entries.append(uncompressed_entry(row, seq_len, 1, i))
        else:
            entries.append(LayoutEntry(row, state.prefix_len, state.prompt_len, seq_len, 1, i, state_mid(state)))
    return LayoutPlan(entries, req_to_token, space)


def decode_attention(layer, q: torch.Tensor, k, v, forward_batch, save_kv_cache: bool, plan: LayoutPlan,
                     pool) -> torch.Tensor:
    """What the attention backend's ``forward_decode`` returns, computed over the layouts."""
    if save_kv_cache:
        save_kv(layer, k, v, forward_batch.out_cache_loc, pool)
    return attend(layer, q, plan, pool)
