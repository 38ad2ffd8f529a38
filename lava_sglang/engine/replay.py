"""Exact re-prefill of a retracted compressed request.

When SGLang retracts a decoding request it frees the request's KV and later prefills it again:
the prompt and the tokens generated so far, in one go. Done naively, the generated tokens would
then attend to the whole prompt, although during decode they only saw the shared prefix, the
cells the policy kept and the earlier generated tokens: the KV of the generated tokens and the
next sampled token would differ from a run without memory pressure.

The replay keeps them identical. The prompt part of the re-prefill is unchanged (causal
attention: prompt positions never see generated ones), so its keys are the ones the request was
compressed from, and the selection it had (``RetractedRequest.keep``) is applied again. In the
re-prefill forward, every query at a position ``>= L`` (a generated token) is recomputed here
with the decode-time visibility: in layer ``l``, KV head ``h`` it sees ``[0, P)``, the positions
``keep[l][h]`` of ``[P, L)`` and ``[L, q]``.

This is plain torch on whatever device the pool lives on, after the backend's own extend
attention (whose rows for those queries it overwrites): retraction is rare and the generated
part is short, so it is not worth a kernel. Tested on CPU (tests/test_reliability.py); on CUDA
the same torch code runs, untested here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ReplayChunk:
    """One replayed request in one extend forward."""

    pending: object  # PendingRequest with ``replay`` set
    token_offset: int  # first row of this request in the batch's flattened extend tokens
    chunk_lo: int  # row position of that first token
    chunk_hi: int  # one past the row position of its last token


def visible_mask(keep_layer: list, prefix_len: int, prompt_len: int, q_lo: int, q_hi: int, device) -> torch.Tensor:
    """``[Hkv, q_hi - q_lo, q_hi]`` bool: which key positions each (head, query position) sees."""
    n_heads = len(keep_layer)
    keys = torch.zeros((n_heads, q_hi), dtype=torch.bool, device=device)
    keys[:, :prefix_len] = True
    keys[:, prompt_len:] = True
    for h, positions in enumerate(keep_layer):
        keys[h, positions.to(device)] = True
    qpos = torch.arange(q_lo, q_hi, device=device)
    causal = torch.arange(q_hi, device=device)[None, :] <= qpos[:, None]
    return keys[:, None, :] & causal[None]


def replay_attention(layer, q: torch.Tensor, out: torch.Tensor, chunks: list, kv_pool, req_to_token: torch.Tensor) -> torch.Tensor:
    """Overwrite ``out``'s rows of generated-token queries of replayed requests (see module doc)."""
    Hq, Hkv, D, Dv = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
    g = Hq // Hkv
    q3 = q.reshape(-1, Hq, D)
    o3 = out.view(-1, Hq, Dv)
    k_buf, v_buf = kv_pool.get_key_buffer(layer.layer_id), kv_pool.get_value_buffer(layer.layer_id)
    for c in chunks:
        pending = c.pending
        P, L = pending.prefix_len, pending.prompt_len
        lo = max(c.chunk_lo, L)
        if lo >= c.chunk_hi:
            continue
        slots = req_to_token[pending.row, :c.chunk_hi].to(torch.long)
        keys = k_buf[slots].to(torch.float32).permute(1, 0, 2)[:, None]  # [Hkv, 1, S, D]
        values = v_buf[slots].to(torch.float32).permute(1, 0, 2)[:, None]  # [Hkv, 1, S, Dv]
        first = c.token_offset + lo - c.chunk_lo
        n = c.chunk_hi - lo
        queries = q3[first:first + n].to(torch.float32).view(n, Hkv, g, D).permute(1, 2, 0, 3)  # [Hkv, g, n, D]
        scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(layer.scaling)  # [Hkv, g, n, S]
        mask = visible_mask(pending.replay.keep[layer.layer_id], P, L, lo, c.chunk_hi, scores.device)
        scores.masked_fill_(~mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o3[first:first + n] = torch.matmul(probs, values).permute(2, 0, 1, 3).reshape(n, Hq, Dv).to(out.dtype)
    return out
