"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks + recency.

Scores are positional, the same for every layer and KV head; budgets are uniform.

Sinks are the first ``N_SINK = 4`` positions *of the sequence* (as kvpress
``StreamingLLMPress(n_sink=4)``). Sink positions inside the shared prefix ``[0, P)`` are
already kept by the engine (the prefix is never evicted), so they are not selected again
and cost no budget; only sink positions in the private scored range ``[P, N - w)``
(i.e. when ``P < 4``) get the top scores. Every other key scores by recency, so each
(layer, KV head) keeps the private sinks, the ``b - #private sinks`` most recent scored
keys, and the window. No queries are needed (``score_layer`` ignores them).

Score of key at position ``j``: ``j + 1`` for a non-sink (strictly increasing, so there
are no ties), ``2 N - j`` for a sink (above every non-sink; earlier sinks first if the
budget cannot hold them all). Exact in fp32 for ``N < 2**23``.
"""

from __future__ import annotations

import torch

from .base import Policy

N_SINK = 4


class StreamingLLMPolicy(Policy):
    name = "streamingllm"
    n_sink = N_SINK

    def score_layer(self, cfg, queries, keys, values, prefix_len):
        n, hkv, _ = keys.shape
        end = n - cfg.window
        if end <= prefix_len:
            return torch.zeros((hkv, 0), dtype=torch.float32, device=keys.device)
        pos = torch.arange(prefix_len, end, dtype=torch.float32, device=keys.device)
        s = torch.where(pos < self.n_sink, 2.0 * n - pos, pos + 1.0)
        return s.unsqueeze(0).expand(hkv, -1).contiguous()


POLICY = StreamingLLMPolicy  # the class POLICY_CLASSES["streamingllm"] names (lava_sglang.policies)
