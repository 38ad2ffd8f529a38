"""Layer and head budget allocation shared by the policies. Engine-free, pure Python + torch.

Units. ``b`` is the per-(layer, KV head) budget *excluding* the observation window
(``CompressionConfig.scored_budget``). A *layer budget* ``B_l`` counts the scored tokens
kept in layer ``l`` over all its KV heads together (window excluded); a *head budget*
counts the scored tokens kept by one (layer, KV head). The total over a request is
``T = n_layers * n_kv_heads * b``.

Exactness. Every split returns integers that sum exactly to what was asked for (the total,
or the layer budget), computed with :class:`fractions.Fraction` so no float rounding can
lose or add a token:

* :func:`apportion` is the one rounding primitive: proportional split with per-item caps
  (an item that cannot hold its share is filled to its cap and the surplus goes to the
  others in proportion to their weights, repeatedly), then largest-remainder rounding.
  Ties between equal remainders go to the lower index.
* A layer can hold at most ``n_kv_heads * n_scored`` tokens and a head at most
  ``n_scored`` (the request's private non-window length); both caps are enforced with
  surplus redistribution.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "apportion",
    "uniform_layer_budgets",
    "pyramid_layer_budgets",
    "entropy_layer_budgets",
    "uniform_head_budgets",
    "cross_head_budgets",
    "topk_desc",
    "floor_per_head",
]


def _frac(x) -> Fraction:
    """Exact Fraction of an int / Fraction, and of a float through its shortest repr
    (so ``0.2`` is exactly 1/5, as the user wrote it)."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, bool):
        raise TypeError("bool is not a number here")
    if isinstance(x, int):
        return Fraction(x)
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"weight must be finite, got {x}")
    return Fraction(repr(x))


def apportion(weights: Sequence, total: int, caps: Sequence[int] | None = None) -> list[int]:
    """Split the integer ``total`` over items in proportion to ``weights``, exactly.

    Returns ``x`` with ``sum(x) == total`` and ``0 <= x[i] <= caps[i]``. Items whose
    proportional share reaches their cap get the cap; the rest of the total is shared among
    the others in proportion to their weights (repeated until no share exceeds a cap).
    The real shares are rounded by largest remainder; equal remainders favour the lower
    index. All-zero weights (among the uncapped items) split uniformly.

    Raises ``ValueError`` when ``total`` exceeds ``sum(caps)`` or is negative, or a weight
    is negative.
    """
    n = len(weights)
    if total < 0:
        raise ValueError(f"total must not be negative, got {total}")
    w = [_frac(x) for x in weights]
    if any(x < 0 for x in w):
        raise ValueError(f"weights must not be negative, got {list(weights)}")
    if caps is None:
        caps = [total] * n
    caps = [int(c) for c in caps]
    if len(caps) != n:
        raise ValueError("weights and caps differ in length")
    if any(c < 0 for c in caps):
        raise ValueError(f"caps must not be negative, got {caps}")
    if total > sum(caps):
        raise ValueError(f"total {total} exceeds the sum of the caps {sum(caps)}")
    if n == 0:
        return []

    out = [0] * n
    active = [i for i in range(n) if caps[i] > 0]
    remaining = total
    while True:
        if not active:
            break
        wsum = sum(w[i] for i in active)
        share = {i: (Fraction(remaining) * w[i] / wsum if wsum > 0 else Fraction(remaining, len(active))) for i in active}
        full = [i for i in active if share[i] >= caps[i]]
        if not full:
            break
        for i in full:
            out[i] = caps[i]
            remaining -= caps[i]
        active = [i for i in active if i not in set(full)]
    if active:
        floors = {i: math.floor(share[i]) for i in active}
        for i in active:
            out[i] = floors[i]
        left = remaining - sum(floors.values())
        # largest remainder; ties -> lower index (sorted() is stable)
        order = sorted(active, key=lambda i: -(share[i] - floors[i]))
        for i in order[:left]:
            out[i] += 1
    assert sum(out) == total, (out, total)
    return out


# --------------------------------------------------------------------------- layer splits


def uniform_layer_budgets(n_layers: int, n_kv_heads: int, b: int, n_scored: int) -> list[int]:
    """SnapKV / AdaKV / StreamingLLM: every layer gets ``n_kv_heads * b`` (capped at
    ``n_kv_heads * n_scored``, which only binds when the request is not compressed)."""
    return [n_kv_heads * min(b, n_scored)] * n_layers


def pyramid_layer_budgets(n_layers: int, n_kv_heads: int, b: int, n_scored: int, beta: float) -> list[int]:
    """PyramidKV's linear pyramid, per KV head, with exact integer totals.

    As in KVCache-Factory ``PyramidKVCluster.update_kv`` (and kvpress ``PyramidKVPress``):
    ``min_num = b / beta``, ``max_num = 2 b - min_num``; if ``max_num`` exceeds what a head
    can hold (``n_scored``; the reference uses ``q_len - window``), ``max_num = n_scored``
    and ``min_num = 2 b - max_num``. Layer ``l`` gets ``max_num - l (max_num - min_num) /
    (L - 1)`` per head: the largest budget at layer 0, the smallest at the last layer, mean
    ``b``. The reference rounds each layer independently with integer division (so its
    total drifts); here the real per-head values are apportioned exactly, so the per-head
    budgets sum to ``L * b`` and each layer gets ``n_kv_heads * b_l`` (uniform heads).
    """
    if n_layers <= 0:
        return []
    b_eff = min(b, n_scored)
    if n_layers == 1:
        return [n_kv_heads * b_eff]
    bf = Fraction(b_eff)
    min_num = bf / _frac(beta)
    max_num = 2 * bf - min_num
    if max_num > n_scored:
        max_num = Fraction(n_scored)
        min_num = 2 * bf - max_num
    step = (max_num - min_num) / (n_layers - 1)
    per_head = [max_num - l * step for l in range(n_layers)]
    per_head = apportion(per_head, n_layers * b_eff, [n_scored] * n_layers)
    return [n_kv_heads * x for x in per_head]


def entropy_layer_budgets(entropies: Sequence[float], total: int, layer_caps: Sequence[int]) -> list[int]:
    """LAVa: ``B_l`` proportional to the normalised layer entropy ``e_l``
    (``B_l = T e_l / sum(e)``), each layer capped at what it can hold, surplus to the others,
    exact largest-remainder rounding (see :func:`apportion`)."""
    return apportion(list(entropies), total, layer_caps)


# --------------------------------------------------------------------------- head splits


def uniform_head_budgets(layer_budget: int, n_kv_heads: int, n_scored: int) -> list[int]:
    """Equal split of a layer budget over its KV heads (remainder to the lower heads)."""
    return apportion([1] * n_kv_heads, layer_budget, [n_scored] * n_kv_heads)


def topk_desc(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of the 1-D ``scores``, deterministic: among
    equal scores the lower index wins (stable descending sort). NaN counts as lowest."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    s = torch.nan_to_num(scores, nan=float("-inf"))
    return torch.sort(s, descending=True, stable=True).indices[:k]


def floor_per_head(layer_budget: int, n_kv_heads: int, alpha: float) -> int:
    """``floor(b_l * alpha)`` with ``b_l = B_l / n_kv_heads``, in exact arithmetic."""
    return math.floor(Fraction(layer_budget, n_kv_heads) * _frac(alpha))


def cross_head_budgets(layer_scores: Tensor, layer_budget: int, alpha: float) -> list[int]:
    """AdaKV / LAVa head budgets: cross-head top-k with a floor.

    ``layer_scores [Hkv, n]``. Take the top ``B_l`` scores over all heads together
    (:func:`topk_desc` on the flattened row-major scores, so ties go to the lower head, then
    the earlier position) and count the winners per head ``c_h`` (``sum c_h = B_l``).
    The reference code's cap is ``round(c_h (1 - alpha) + floor(b_l alpha))``, which does not
    sum to ``B_l`` in general. Here every head gets the floor ``f = floor(b_l alpha)`` and the
    rest ``B_l - Hkv f`` is apportioned in proportion to ``c_h``::

        cap_h = f + largest_remainder((B_l - Hkv f) c_h / B_l)

    which equals the reference's real value ``c_h (1 - alpha) + f`` whenever ``b_l alpha``
    is an integer, sums to ``B_l`` exactly, keeps ``cap_h >= f`` and ``cap_h <= n``
    (surplus of a full head goes to the others).
    """
    hkv, n = layer_scores.shape
    if layer_budget > hkv * n:
        raise ValueError(f"layer budget {layer_budget} exceeds what {hkv} heads of {n} tokens hold")
    if layer_budget <= 0:
        return [0] * hkv
    winners = topk_desc(layer_scores.reshape(-1), layer_budget) // n
    counts = torch.bincount(winners, minlength=hkv).tolist()
    f = min(floor_per_head(layer_budget, hkv, alpha), n)
    rest = layer_budget - hkv * f
    extra = apportion(counts, rest, [n - f] * hkv)
    return [f + e for e in extra]
