"""AdaKV (Feng et al., arXiv 2407.11550): SnapKV scores (mean over the GQA group),
uniform layer budgets, adaptive head budgets by cross-head top-k with a floor ``alpha``.

Head split (AdaKV reference code, ``AdaptiveSnapKVCluster``): the top ``B_l = Hkv b``
scores of the layer over all KV heads together decide how many tokens ``c_h`` each head
wins; ``cap_h = c_h (1 - alpha) + floor(b alpha)`` rounded exactly to sum to ``B_l``
(:func:`lava_sglang.budgets.cross_head_budgets`); each head keeps its own top ``cap_h``.

kvpress ``AdaKVPress`` implements the floor differently: it first protects each head's
top ``int(n_kept * alpha)`` tokens (window included, since the window scores highest) and
then takes the global top-k of the rest. Both coincide for ``alpha = 0`` (pure cross-head
top-k) and ``alpha = 1`` (uniform); in between they are two different floors.
"""

from __future__ import annotations

from .. import budgets as B
from .snapkv import SnapKVPolicy


class AdaKVPolicy(SnapKVPolicy):
    name = "adakv"

    def head_budgets(self, cfg, layer_scores, layer_budget):
        return B.cross_head_budgets(layer_scores, layer_budget, cfg.floor_alpha)


POLICY = AdaKVPolicy  # the class POLICY_CLASSES["adakv"] names (lava_sglang.policies)
