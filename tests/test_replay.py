"""The retraction replay's attention (engine/replay.py) against a per-query reference.

A re-prefilled generated token must see, per (layer, KV head), what it saw during decode: the
shared prefix, the kept positions of the compressed range and the generated tokens up to itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lava_sglang.engine.cells import pool_cells
from lava_sglang.engine.layout import LayoutPlan, attend
from lava_sglang.engine.replay import ReplayChunk
from lava_sglang.engine.state import PendingRequest, RetractedRequest


class Pool:
    def __init__(self, k, v):
        self.k, self.v = k, v
        self.layer_num = k.shape[0]

    def get_key_buffer(self, layer_id):
        return self.k[layer_id]

    def get_value_buffer(self, layer_id):
        return self.v[layer_id]


def reference(q, k_buf, v_buf, slots, keep, P, L, positions, g, scaling):
    """One query position and one query head at a time, keys listed explicitly."""
    Hq = q.shape[1]
    out = torch.zeros(len(positions), Hq, v_buf.shape[-1], dtype=torch.float64)
    for i, pos in enumerate(positions):
        for hq in range(Hq):
            h = hq // g
            visible = list(range(P)) + sorted(int(x) for x in keep[h]) + list(range(L, pos + 1))
            ks = k_buf[slots[visible], h].double()
            vs = v_buf[slots[visible], h].double()
            p = torch.softmax(ks @ q[i, hq].double() * scaling, dim=0)
            out[i, hq] = p @ vs
    return out


@pytest.mark.parametrize("chunk_lo", [0, 9, 20])
def test_replay_attention_matches_decode_visibility(chunk_lo):
    torch.manual_seed(0)
    n_layers, Hkv, g, D = 2, 3, 3, 8
    Hq = Hkv * g
    P, L, G = 5, 18, 6  # shared prefix, prompt, generated tokens re-prefilled
    S = L + G
    pool_size = 64
    k = torch.randn(n_layers, pool_size, Hkv, D)
    v = torch.randn(n_layers, pool_size, Hkv, D)
    row = 1
    req_to_token = torch.zeros(3, 40, dtype=torch.int32)
    req_to_token[row, :S] = torch.randperm(pool_size - 1)[:S].to(torch.int32) + 1
    keep = [[torch.tensor(sorted(torch.randperm(L - P)[:4].add(P).tolist())) for _ in range(Hkv)] for _ in range(n_layers)]
    saved = RetractedRequest("r", None, P, L, keep)
    pending = PendingRequest(rid="r", row=row, config=None, prefix_len=P, prompt_len=L, replay=saved)
    n_tok = S - chunk_lo
    other = 4  # another request's tokens first in the batch
    q = torch.randn(other + n_tok, Hq * D)
    out = torch.full((other + n_tok, Hq * D), 7.0)
    chunk = ReplayChunk(pending, other, chunk_lo, S)
    slots = req_to_token[row].long()
    for layer_id in range(n_layers):
        layer = SimpleNamespace(tp_q_head_num=Hq, tp_k_head_num=Hkv, qk_head_dim=D, v_head_dim=D, layer_id=layer_id,
                                scaling=D ** -0.5)
        space = pool_cells(Pool(k, v))
        plan = LayoutPlan([chunk.layout_entry(req_to_token, space)], req_to_token, space)
        got = attend(layer, q, plan, Pool(k, v), out.clone())
        first = other + max(chunk_lo, L) - chunk_lo
        # rows before the generated tokens (other request, prompt positions) are left as the backend wrote them
        assert torch.equal(got[:first], out[:first])
        positions = list(range(max(chunk_lo, L), S))
        ref = reference(q[first:].view(-1, Hq, D), k[layer_id], v[layer_id], slots, keep[layer_id], P, L, positions, g, D ** -0.5)
        torch.testing.assert_close(got[first:].view(-1, Hq, D).double(), ref, rtol=1e-5, atol=1e-5)


def test_no_entry_when_the_chunk_holds_no_generated_token():
    pending = PendingRequest(rid="r", row=0, config=None, prefix_len=2, prompt_len=10,
                             replay=RetractedRequest("r", None, 2, 10, []))
    assert ReplayChunk(pending, 0, 0, 10).layout_entry(torch.zeros(1, 16, dtype=torch.int32), None) is None
