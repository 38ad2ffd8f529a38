"""KV-cache compression policies, engine-free (pure torch; never imports SGLang).

Entry points::

    get_policy(name) -> Policy          # "streamingllm" | "snapkv" | "pyramidkv" | "adakv" | "lava"
    select_request(cfg, queries, keys, values, prefix_len) -> Selection
    select_batch(cfg, [(queries, keys, values, prefix_len), ...]) -> list[Selection]

Per layer ``l``: ``queries[l] [w, Hq, D]`` are the post-RoPE queries of the last ``w``
prompt positions, ``keys[l]`` / ``values[l]`` ``[N, Hkv, D]`` the request's keys and values
(prefix included). See :mod:`.base` for the ranges, the compression condition and the
tie-breaking rule, :mod:`.scoring` for the shared scoring steps.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from importlib import import_module

from ..config import POLICIES, CompressionConfig
from .base import AttentionPolicy, Policy, Selection, keep_all, needs_compression

__all__ = [
    "POLICY_CLASSES",
    "Policy",
    "AttentionPolicy",
    "Selection",
    "get_policy",
    "select_request",
    "select_batch",
    "needs_compression",
    "keep_all",
]

# One list of policies (``config.POLICIES``): each name but "none" is a module of this package
# that exports its class as ``POLICY``.
POLICY_CLASSES: dict[str, type[Policy]] = {
    name: import_module(f"{__name__}.{name}").POLICY for name in POLICIES if name != "none"
}
for _name, _cls in POLICY_CLASSES.items():
    if _cls.name != _name:
        raise ImportError(f"policy module {_name} exports POLICY named {_cls.name!r}; a policy's name is its module's")


def get_policy(name: str) -> Policy:
    """A policy instance by name. ``"none"`` is not a policy (nothing is compressed)."""
    try:
        return POLICY_CLASSES[name]()
    except KeyError:
        raise ValueError(f"unknown compression policy {name!r}; choose one of {', '.join(POLICY_CLASSES)}") from None


def select_request(
    cfg: CompressionConfig,
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    prefix_len: int,
) -> Selection:
    """Score every layer of one request and select what it keeps.

    Scores layer by layer (one layer's attention in memory at a time), then budgets and
    top-k from the small score rows. Requests that are not compressed
    (:func:`needs_compression` false, including ``cfg.policy == "none"``) are not scored and
    keep every private position.
    """
    cfg.validate()
    n_layers = len(keys)
    if not (len(queries) == len(values) == n_layers) or n_layers == 0:
        raise ValueError(f"need the same positive number of layers for queries, keys, values; got "
                         f"{len(queries)}, {len(keys)}, {len(values)}")
    seq_len, hkv = keys[0].shape[0], keys[0].shape[1]
    if not 0 <= prefix_len <= seq_len:
        raise ValueError(f"prefix_len={prefix_len} outside [0, {seq_len}]")
    for l in range(n_layers):
        if keys[l].shape[:2] != (seq_len, hkv) or values[l].shape[:2] != (seq_len, hkv):
            raise ValueError(f"layer {l}: keys {tuple(keys[l].shape)} / values {tuple(values[l].shape)} "
                             f"do not match [N={seq_len}, Hkv={hkv}, D]")
    if not needs_compression(cfg, prefix_len, seq_len):
        return keep_all(n_layers, hkv, prefix_len, seq_len, cfg.window, keys[0].device, cfg.policy)
    policy = get_policy(cfg.policy)
    scores = [policy.score_layer(cfg, queries[l], keys[l], values[l], prefix_len) for l in range(n_layers)]
    return policy.select(cfg, scores, prefix_len, seq_len)


def select_batch(
    cfg: CompressionConfig,
    requests: Sequence[tuple[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor], int]],
) -> list[Selection]:
    """``[select_request(cfg, *r) for r in requests]``: every request is scored and budgeted
    on its own, so a request's selection never depends on the others in the batch."""
    return [select_request(cfg, q, k, v, p) for (q, k, v, p) in requests]
