"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV scores, pyramid layer budgets.

Per KV head, layer ``l`` of ``L`` keeps ``max_num - l (max_num - min_num) / (L - 1)``
scored tokens with ``min_num = b / beta`` and ``max_num = 2 b - min_num`` (KVCache-Factory
``PyramidKVCluster``; kvpress ``PyramidKVPress``): most at layer 0, fewest at the last
layer, mean ``b``. The per-head values are apportioned exactly so the total is
``L * Hkv * b`` (see :func:`lava_sglang.budgets.pyramid_layer_budgets`); heads of a layer
split uniformly.
"""

from __future__ import annotations

from .. import budgets as B
from .snapkv import SnapKVPolicy


class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"

    def layer_budgets(self, cfg, scores, prefix_len=0, seq_len=0):
        hkv, n = scores[0].shape
        return B.pyramid_layer_budgets(len(scores), hkv, cfg.scored_budget, n, cfg.pyramid_beta)


POLICY = PyramidKVPolicy  # the class POLICY_CLASSES["pyramidkv"] names (lava_sglang.policies)
