"""LAVa (arXiv 2509.09754; reference code github.com/MGDDestiny/Lava); ``docs/design.md``, "Compression".

Score of private non-window key ``j`` in layer ``l``, KV head ``kvh``::

    a[h, j]   = mean over the w window queries of softmax attention (query head h)
    a[h, :]   = pool(a[h, :])                        # max-pool kernel k by default
    a[h, :]  *= max_{j' in [P, N-w)} ||V[j', kvh(h)]||_1   # value-norm factor of the head
    s[kvh, j] = max over the query heads h of group kvh of a[h, j]

Layer budgets: ``e_l = H(p_l) / log(Hkv n)`` with ``p_l`` the layer's scores flattened
over (KV heads x tokens) and normalised; ``B_l = T e_l / sum(e)`` with ``T = L Hkv b``,
each layer capped at ``Hkv n`` with the surplus handed to the others, exact rounding.
The reference code reaches this split progressively during prefill and trims earlier
layers; here all layers are known, so it is allocated once.

Head budgets: cross-head top-``B_l`` winner counts with floor ``alpha``
(:func:`lava_sglang.budgets.cross_head_budgets`), exact rounding, heads capped at ``n``.

Differences from the reference code (documented choices): the value-norm factor is taken
over the *private* non-window keys (the reference has no shared prefix, so it is all
non-window keys there); the reference's per-layer cap uses ``int()`` truncation (total
drifts) and skips layers that cannot hold their share, here the totals are exact and the
surplus is redistributed.
"""

from __future__ import annotations

from .. import budgets as B
from .base import AttentionPolicy
from .scoring import layer_entropy


class LAVaPolicy(AttentionPolicy):
    name = "lava"
    gqa = "max"
    value_norm = True

    def layer_entropies(self, scores) -> list[float]:
        return [layer_entropy(s) for s in scores]

    def layer_budgets(self, cfg, scores, prefix_len=0, seq_len=0):
        hkv, n = scores[0].shape
        total = len(scores) * hkv * min(cfg.scored_budget, n)
        return B.entropy_layer_budgets(self.layer_entropies(scores), total, [hkv * n] * len(scores))

    def head_budgets(self, cfg, layer_scores, layer_budget):
        return B.cross_head_budgets(layer_scores, layer_budget, cfg.floor_alpha)


POLICY = LAVaPolicy  # the class POLICY_CLASSES["lava"] names (lava_sglang.policies)
