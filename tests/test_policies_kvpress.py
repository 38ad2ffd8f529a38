"""Agreement with kvpress (NVIDIA/kvpress, PyPI 0.5.5) on CPU.

A tiny HF transformers ``LlamaAttention`` with random weights lets kvpress do what it does
inside a model: recompute the window queries from the hidden states (``q_proj`` + RoPE)
and score the post-RoPE keys. Our policies get the same post-RoPE window queries, keys and
values directly (what the engine captures in SGLang).

Equivalent configuration (no shared prefix, ``P = 0``; kvpress has no prefix concept):

* ``window``, ``kernel_size`` equal; ``pooling="avg"`` (kvpress's SnapKV only avg-pools).
* kvpress keeps ``n_kept = max(1, int(N * (1 - compression_ratio)))`` tokens per head *window
  included* (its window keys score ``max + 1``); our ``budget`` counts the window too, so
  ``budget = n_kept``. We pick ``compression_ratio = (N - budget - 0.5) / N`` so that
  ``int(N * (1 - ratio)) = int(budget + 0.5)`` is exactly ``budget`` despite float error.
* AdaKV's floor: kvpress protects each head's top ``int(n_kept * alpha)`` tokens (window
  included) and takes the global top-k of the rest; the AdaKV/LAVa reference code (ours)
  mixes the cross-head winner counts with the floor, ``c_h (1 - alpha) + floor(b alpha)``.
  Both are exactly cross-head top-k at ``alpha = 0`` and exactly uniform at ``alpha = 1``;
  those are compared token for token. In between they are different algorithms; we only
  check they mostly agree.
"""

from __future__ import annotations

import pytest
import torch

kvpress = pytest.importorskip("kvpress")
from transformers import LlamaConfig  # noqa: E402  (after the guard: transformers comes with kvpress)
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaAttention,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from lava_sglang.config import CompressionConfig  # noqa: E402
from lava_sglang.policies import get_policy, select_request  # noqa: E402


def build(n_heads, n_kv, head_dim, N, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=n_heads * head_dim,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=32,
        num_hidden_layers=1,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    )
    config._attn_implementation = "sdpa"  # AdaKVPress refuses eager
    attn = LlamaAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            # q, k entries ~ N(0, 1.5^2): logits of std ~2, attention neither flat nor one-hot
            # (one-hot attention underflows to exact zeros and creates exact pooling ties)
            lin.weight.normal_(0, 1.5 / config.hidden_size**0.5)
    rotary = LlamaRotaryEmbedding(config)
    hidden = torch.randn(1, N, config.hidden_size)
    pos = torch.arange(N)[None]
    with torch.no_grad():
        cos, sin = rotary(hidden, pos)
        q = attn.q_proj(hidden).view(1, N, n_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(1, N, n_kv, head_dim).transpose(1, 2)
        v = attn.v_proj(hidden).view(1, N, n_kv, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return attn, hidden, (cos, sin), q, k, v


def ratio_for(budget, N):
    """compression_ratio whose kvpress ``n_kept`` is exactly ``budget`` (window included)."""
    from kvpress.utils import compute_n_kept

    cr = (N - budget - 0.5) / N
    assert compute_n_kept(N, cr) == budget
    return cr


def ours(cfg, q, k, v):
    w = cfg.window
    return select_request(cfg, [q[0, :, -w:].transpose(0, 1)], [k[0].transpose(0, 1)], [v[0].transpose(0, 1)], 0)


def kvpress_snapkv_keep(press, attn, hidden, pe, k, v):
    """Run SnapKVPress.compress and map the kept keys back to positions."""
    with torch.no_grad():
        kept, _ = press.compress(attn, hidden, k, v, None, {"position_embeddings": pe})
    out = []
    for h in range(k.shape[1]):
        match = (kept[0, h][:, None, :] == k[0, h][None, :, :]).all(-1)  # [n_kept, N]
        assert (match.sum(-1) == 1).all()
        out.append(sorted(match.float().argmax(-1).tolist()))
    return out


def kvpress_adakv_keep(press, attn, hidden, pe, k, v):
    with torch.no_grad():
        press.compress(attn, hidden, k, v, None, {"position_embeddings": pe})
    _, heads, seq = attn.masked_key_indices
    N = k.shape[2]
    out = []
    for h in range(k.shape[1]):
        pruned = set(seq[heads == h].tolist())
        out.append([j for j in range(N) if j not in pruned])
    del attn.masked_key_indices
    return out


def assert_same_up_to_boundary_ties(ours_keep, ref_keep, scores, w, per_head):
    """Token-for-token equality, except that keys whose score ties the selection boundary
    (within float noise between the two implementations) may be swapped: kvpress uses
    ``torch.topk`` (unspecified order among equal values), we take the lower position.
    ``scores [Hkv, n]`` are the scored part; ``per_head`` says whether the boundary is per
    head (uniform budgets) or across heads (cross-head top-k)."""
    hkv, n = scores.shape
    ours_set = {(h, j) for h in range(hkv) for j in ours_keep[h] if j < n}
    ref_set = {(h, j) for h in range(hkv) for j in ref_keep[h] if j < n}
    for h in range(hkv):  # the window is kept by both
        assert [j for j in ours_keep[h] if j >= n] == [j for j in ref_keep[h] if j >= n] == list(range(n, n + w))
    assert len(ours_set) == len(ref_set)
    diff = ours_set ^ ref_set
    if not diff:
        return
    for h, j in diff:
        kept = [scores[hh, jj].item() for hh, jj in ref_set | ours_set if (hh == h or not per_head)]
        boundary = min(kept)
        assert abs(scores[h, j].item() - boundary) <= 1e-5 * abs(boundary) + 1e-9, (h, j, scores[h, j].item(), boundary)
    assert len(diff) <= 0.1 * len(ref_set)


CASES = [
    # n_heads, n_kv, head_dim, N, window, kernel, budget
    (4, 4, 16, 96, 8, 5, 40),
    (6, 2, 32, 160, 16, 5, 48),
    (9, 3, 64, 200, 32, 7, 64),  # the default model's head layout
    (8, 1, 8, 120, 4, 3, 20),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_snapkv_matches_kvpress(case, seed):
    n_heads, n_kv, d, N, w, ks, budget = case
    attn, hidden, pe, q, k, v = build(n_heads, n_kv, d, N, seed)
    press = kvpress.SnapKVPress(compression_ratio=ratio_for(budget, N), window_size=w, kernel_size=ks)
    cfg = CompressionConfig(policy="snapkv", budget=budget, window=w, kernel_size=ks, pooling="avg")

    # scores: kvpress pads the window with max + 1; the scored part must agree
    with torch.no_grad():
        ref_scores = press.score(attn, hidden, k, v, None, {"position_embeddings": pe})[0, :, :-w]
    our_scores = get_policy("snapkv").score_layer(cfg, q[0, :, -w:].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), 0)
    torch.testing.assert_close(our_scores, ref_scores, rtol=1e-4, atol=1e-7)

    sel = ours(cfg, q, k, v)
    ref = kvpress_snapkv_keep(press, attn, hidden, pe, k, v)
    assert_same_up_to_boundary_ties([t.tolist() for t in sel.keep[0]], ref, ref_scores, w, per_head=True)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_adakv_matches_kvpress(case, alpha, seed):
    n_heads, n_kv, d, N, w, ks, budget = case
    attn, hidden, pe, q, k, v = build(n_heads, n_kv, d, N, seed)
    inner = kvpress.SnapKVPress(compression_ratio=ratio_for(budget, N), window_size=w, kernel_size=ks)
    press = kvpress.AdaKVPress(press=inner, alpha_safeguard=alpha)
    cfg = CompressionConfig(policy="adakv", budget=budget, window=w, kernel_size=ks, pooling="avg", floor_alpha=alpha)
    sel = ours(cfg, q, k, v)
    ref = kvpress_adakv_keep(press, attn, hidden, pe, k, v)
    assert sum(len(r) for r in ref) == n_kv * budget == sel.kept_cells
    assert_same_up_to_boundary_ties([t.tolist() for t in sel.keep[0]], ref, sel.scores[0], w, per_head=alpha == 1.0)


@pytest.mark.parametrize("case", CASES[1:3])
def test_adakv_intermediate_floor_mostly_agrees(case):
    """alpha = 0.2: two different floors (see module docstring); same total, large overlap."""
    n_heads, n_kv, d, N, w, ks, budget = case
    attn, hidden, pe, q, k, v = build(n_heads, n_kv, d, N, 0)
    inner = kvpress.SnapKVPress(compression_ratio=ratio_for(budget, N), window_size=w, kernel_size=ks)
    press = kvpress.AdaKVPress(press=inner, alpha_safeguard=0.2)
    cfg = CompressionConfig(policy="adakv", budget=budget, window=w, kernel_size=ks, pooling="avg", floor_alpha=0.2)
    sel = ours(cfg, q, k, v)
    ref = kvpress_adakv_keep(press, attn, hidden, pe, k, v)
    ours_set = {(h, j) for h, t in enumerate(sel.keep[0]) for j in t.tolist()}
    ref_set = {(h, j) for h, t in enumerate(ref) for j in t}
    assert len(ours_set) == len(ref_set) == n_kv * budget
    assert len(ours_set & ref_set) >= 0.85 * len(ref_set)
