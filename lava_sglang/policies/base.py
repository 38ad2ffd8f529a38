"""Policy interface and the Selection record. Engine-free: never imports SGLang.

Two phases, on purpose (the engine streams layer by layer out of the KV pool and must not
hold all layers' K/V at once):

1. ``score_layer`` per layer -> small fp32 ``[Hkv, n_scored]`` score rows;
2. ``select`` from all layers' scores -> layer budgets, head budgets, kept positions.

Ranges of one request of ``N`` positions with a shared prefix of ``P`` and window ``w``:

* ``[0, P)``: shared prefix. Never scored, never selected (the engine keeps it implicitly).
  Its keys still count in the softmax normalisation of the window attention.
* ``[P, N - w)``: scored range, ``n_scored = N - P - w`` keys, column ``i`` = position ``P + i``.
* ``[N - w, N)``: the window, always kept.

A request is compressed only when its private range is longer than ``budget`` (which
counts the window, i.e. ``N - P > b + w``) and ``N >= min_prompt_len``; otherwise every
private position is kept.

Tie-breaking (everywhere, deterministic): among equal scores the lower index wins, i.e. the
earlier position inside a head, and in the cross-head ranking the lower KV head first,
then the earlier position. Rounding ties in the budget splits also go to the lower index
(lower layer / lower head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..config import CompressionConfig
from .. import budgets as B
from .scoring import DEFAULT_KEY_CHUNK, attention_scores

__all__ = ["Selection", "Policy", "AttentionPolicy", "needs_compression", "keep_all"]


@dataclass
class Selection:
    """What one request keeps after compression.

    ``keep[l][h]``: sorted int64 absolute positions in ``[prefix_len, seq_len)`` kept by
    layer ``l``, KV head ``h``; the window (last ``window`` positions) is always included;
    prefix positions never appear. ``layer_budgets[l]`` / ``head_budgets[l][h]`` count the
    scored tokens kept (window excluded); ``sum(head_budgets[l]) == layer_budgets[l]``.
    """

    compressed: bool
    keep: list[list[Tensor]]
    layer_budgets: list[int]
    head_budgets: list[list[int]]
    scores: list[Tensor] | None
    prefix_len: int = 0
    seq_len: int = 0
    window: int = 0
    policy: str = ""

    @property
    def n_layers(self) -> int:
        return len(self.keep)

    @property
    def n_kv_heads(self) -> int:
        return len(self.keep[0]) if self.keep else 0

    @property
    def window_len(self) -> int:
        """Window positions actually kept per head (``min(window, seq_len - prefix_len)``)."""
        return max(0, min(self.window, self.seq_len - self.prefix_len))

    @property
    def kept_per_layer(self) -> list[int]:
        """Kept cells per layer, all KV heads together, window included."""
        return [sum(int(t.numel()) for t in heads) for heads in self.keep]

    @property
    def kept_cells(self) -> int:
        """Kept cells over all layers and KV heads, window included."""
        return sum(self.kept_per_layer)

    @property
    def private_cells(self) -> int:
        """Cells the private range occupies uncompressed: ``L * Hkv * (N - P)``."""
        return self.n_layers * self.n_kv_heads * (self.seq_len - self.prefix_len)


def needs_compression(cfg: CompressionConfig, prefix_len: int, seq_len: int) -> bool:
    """True when a request of ``seq_len`` positions with a shared prefix of ``prefix_len``
    is compressed: policy enabled, ``seq_len >= cfg.min_prompt_len`` and the private range
    ``seq_len - prefix_len`` is longer than ``cfg.budget`` (= ``b + w``)."""
    return cfg.enabled and seq_len >= cfg.min_prompt_len and seq_len - prefix_len > cfg.budget


def keep_all(n_layers: int, n_kv_heads: int, prefix_len: int, seq_len: int, window: int,
             device=None, policy: str = "") -> Selection:
    """The uncompressed Selection: every private position kept in every (layer, head)."""
    pos = torch.arange(prefix_len, seq_len, dtype=torch.long, device=device)
    n_scored = max(0, seq_len - prefix_len - window)
    return Selection(
        compressed=False,
        keep=[[pos.clone() for _ in range(n_kv_heads)] for _ in range(n_layers)],
        layer_budgets=[n_kv_heads * n_scored] * n_layers,
        head_budgets=[[n_scored] * n_kv_heads for _ in range(n_layers)],
        scores=None,
        prefix_len=prefix_len,
        seq_len=seq_len,
        window=window,
        policy=policy,
    )


class Policy:
    """One compression policy (kvpress style: a small subclass per module).

    Subclasses set ``name`` and override ``score_layer`` and, when not uniform,
    ``layer_budgets`` / ``head_budgets``. ``select`` is shared.
    """

    name: str = ""

    # ---- phase 1: per layer
    def score_layer(self, cfg: CompressionConfig, queries: Tensor, keys: Tensor, values: Tensor,
                    prefix_len: int) -> Tensor:
        """fp32 ``[Hkv, N - prefix_len - w]``: score of each private non-window key."""
        raise NotImplementedError

    # ---- phase 2: budgets and selection from all layers' scores
    def layer_budgets(self, cfg: CompressionConfig, scores: Sequence[Tensor], prefix_len: int = 0,
                      seq_len: int = 0) -> list[int]:
        """Scored tokens per layer (all KV heads), window excluded. Default: uniform."""
        hkv, n = scores[0].shape
        return B.uniform_layer_budgets(len(scores), hkv, cfg.scored_budget, n)

    def head_budgets(self, cfg: CompressionConfig, layer_scores: Tensor, layer_budget: int) -> list[int]:
        """Split one layer's budget over its KV heads. Default: uniform."""
        hkv, n = layer_scores.shape
        return B.uniform_head_budgets(layer_budget, hkv, n)

    def select(self, cfg: CompressionConfig, scores: Sequence[Tensor], prefix_len: int, seq_len: int) -> Selection:
        """Budgets + per-head top-k from the scores only (no K/V needed)."""
        w = cfg.window
        if not scores:
            raise ValueError("no layers")
        hkv = scores[0].shape[0]
        n_scored = seq_len - prefix_len - w
        for l, s in enumerate(scores):
            if s.dim() != 2 or s.shape != (hkv, max(0, n_scored)):
                raise ValueError(f"layer {l}: scores of shape {tuple(s.shape)}, expected ({hkv}, {max(0, n_scored)})")
        if not needs_compression(cfg, prefix_len, seq_len):
            sel = keep_all(len(scores), hkv, prefix_len, seq_len, w, scores[0].device, self.name)
            sel.scores = list(scores)
            return sel
        layer_budgets = self.layer_budgets(cfg, scores, prefix_len, seq_len)
        assert len(layer_budgets) == len(scores)
        device = scores[0].device
        window = torch.arange(seq_len - w, seq_len, dtype=torch.long, device=device)
        keep, head_budgets = [], []
        for s, bl in zip(scores, layer_budgets):
            hb = [int(x) for x in self.head_budgets(cfg, s, int(bl))]
            assert sum(hb) == bl and all(0 <= x <= n_scored for x in hb), (hb, bl)
            rows = []
            for h, k in enumerate(hb):
                idx = B.topk_desc(s[h], k)
                pos = torch.sort(idx).values + prefix_len
                rows.append(torch.cat([pos, window]))
            keep.append(rows)
            head_budgets.append(hb)
        return Selection(
            compressed=True,
            keep=keep,
            layer_budgets=[int(x) for x in layer_budgets],
            head_budgets=head_budgets,
            scores=list(scores),
            prefix_len=prefix_len,
            seq_len=seq_len,
            window=w,
            policy=self.name,
        )


class AttentionPolicy(Policy):
    """Window-attention scoring shared by SnapKV, PyramidKV, AdaKV and LAVa."""

    gqa: str = "mean"  # reduction over the query heads of a KV group
    value_norm: bool = False  # LAVa's max-||V||_1 head factor
    key_chunk: int | None = DEFAULT_KEY_CHUNK

    def score_layer(self, cfg, queries, keys, values, prefix_len):
        n_scored = keys.shape[0] - prefix_len - cfg.window
        if n_scored <= 0:  # nothing to score (such a request is never compressed)
            return torch.zeros((keys.shape[1], 0), dtype=torch.float32, device=keys.device)
        if queries.shape[0] != cfg.window:
            raise ValueError(f"expected the {cfg.window} window queries, got {queries.shape[0]}")
        return attention_scores(
            queries, keys, values, prefix_len,
            kernel_size=cfg.kernel_size, pooling=cfg.pooling, gqa=self.gqa,
            value_norm=self.value_norm, key_chunk=self.key_chunk,
        )
