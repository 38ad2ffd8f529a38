"""SnapKV (Li et al., arXiv 2404.14469).

Score: mean attention of the window queries on each key, pooled (kernel ``k``, same
length), averaged over the query heads of a GQA group (the mean reduction of AdaKV's GQA
support and of kvpress ``SnapKVPress``). Budgets: uniform, ``b`` scored tokens per
(layer, KV head) plus the window.

Conventions vs. the references:

* kvpress ``SnapKVPress`` recomputes the window queries from the hidden states inside the
  attention module; here the engine passes the captured post-RoPE queries.
* kvpress counts ``n_kept = int(N * (1 - compression_ratio))`` tokens *including* the
  window (its window keys get score ``max + 1``); our ``budget`` also counts the window,
  so ``budget == n_kept`` when ``P = 0``. kvpress pools with ``avg_pool1d`` (kernel 5) and
  window 64 by default; set ``pooling="avg"`` and the same kernel/window to compare.
* Order of steps: pool each query head, then average the group (kvpress order). AdaKV's
  reference code averages first and pools after; with average pooling the two agree up to
  float rounding, with max pooling they differ.
* The original SnapKV / KVCache-Factory sums over the window queries instead of averaging
  (same ranking, different scale).
"""

from __future__ import annotations

from .base import AttentionPolicy


class SnapKVPolicy(AttentionPolicy):
    name = "snapkv"
    gqa = "mean"
    value_norm = False


POLICY = SnapKVPolicy  # the class POLICY_CLASSES["snapkv"] names (lava_sglang.policies)
