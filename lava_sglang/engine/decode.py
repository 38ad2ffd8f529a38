"""Decode attention for batches that hold compressed requests (DESIGN.md section 5).

Every (request, KV head) pair of a layer reads: the shared prefix cells ``row[0:P]``, its
compressed cells of that layer, then the decode cells ``row[L:seq_len]``. An uncompressed
request is the same with ``P = L = seq_len`` and no compressed cells, so a mixed batch is one
code path. The row ranges are the same in every layer and are gathered once per step; only the
compressed cells differ per layer. The attention itself is
:func:`lava_sglang.kernels.decode_attention.paged_decode_attention` (batched torch on CPU,
Triton / FlashInfer on CUDA).
"""

from __future__ import annotations

import torch

from lava_sglang.engine.state import Registry
from lava_sglang.kernels.decode_attention import build_pair_indices, gather_row_ranges, paged_decode_attention


class DecodePlan:
    """Cell lists of one decode forward batch, built once and shared by all layers."""

    def __init__(self, registry: Registry, req_to_token: torch.Tensor, rows: list[int], seq_lens: list[int],
                 n_kv_heads: int):
        self.n_kv_heads = n_kv_heads
        device = req_to_token.device
        states = [registry.compressed_for(r) for r in rows]
        self.states = states
        prefix_end = [s.prefix_len if s is not None else n for s, n in zip(states, seq_lens)]
        suffix_start = [s.prompt_len if s is not None else n for s, n in zip(states, seq_lens)]
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        zeros = torch.zeros(len(rows), dtype=torch.long, device=device)
        self.prefix_slots, self.prefix_lens = gather_row_ranges(req_to_token, rows_t, zeros, torch.tensor(prefix_end, device=device))
        self.suffix_slots, self.suffix_lens = gather_row_ranges(
            req_to_token, rows_t, torch.tensor(suffix_start, device=device), torch.tensor(seq_lens, device=device))
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def indices(self, layer_id: int):
        cached = self._layers.get(layer_id)
        if cached is not None:
            return cached
        H = self.n_kv_heads
        pieces, lens = [], []
        for s in self.states:
            if s is None:
                lens.append(torch.zeros(H, dtype=torch.long))
            else:
                pieces.append(s.mid_cells[layer_id])
                lens.append(s.mid_lens[layer_id])
        device = self.prefix_slots.device
        mid = torch.cat(pieces).to(device) if pieces else torch.zeros(0, dtype=torch.long, device=device)
        mid_lens = torch.stack(lens).to(device)
        built = build_pair_indices(H, self.prefix_slots, self.prefix_lens, self.suffix_slots, self.suffix_lens, mid, mid_lens)
        self._layers[layer_id] = built
        return built


def decode_attention(layer, q: torch.Tensor, k, v, forward_batch, save_kv_cache: bool, plan: DecodePlan,
                     pool) -> torch.Tensor:
    """What the attention backend's ``forward_decode`` returns, computed over the per-head lists."""
    Hq, Hkv, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
    if save_kv_cache and k is not None and v is not None:
        pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k.view(-1, Hkv, D), v.view(-1, Hkv, layer.v_head_dim))
    g = Hq // Hkv
    k_flat = pool.get_key_buffer(layer.layer_id).view(-1, D)
    v_flat = pool.get_value_buffer(layer.layer_id).view(-1, layer.v_head_dim)
    pairs = plan.indices(layer.layer_id)
    batch = q.shape[0] if q.dim() == 2 else q.view(-1, Hq * D).shape[0]
    q_pairs = q.reshape(batch, Hkv, g, D).reshape(batch * Hkv, g, D)
    out = paged_decode_attention(q_pairs, k_flat, v_flat, pairs.kv_indptr, pairs.kv_indices, layer.scaling)
    return out.reshape(batch, Hq * layer.v_head_dim)
