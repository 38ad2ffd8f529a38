"""Shared scoring steps of the attention-based policies (SnapKV, PyramidKV, AdaKV, LAVa).

Pure torch, engine-free (never imports SGLang). These small functions are also the torch
reference of the scoring steps (``docs/design.md``, "Compression"): each one does exactly one
step and documents its shapes.

Conventions shared by every function here (one request, one layer):

* ``queries``: ``[w, Hq, D]`` post-RoPE queries of the last ``w`` prompt positions
  ``N-w .. N-1`` (the observation window).
* ``keys`` / ``values``: ``[N, Hkv, D]`` post-RoPE keys and the values of all ``N``
  positions of the request, shared prefix included.
* ``prefix_len`` (``P``): positions ``[0, P)`` belong to a shared radix prefix. Their keys
  take part in the softmax normalisation but are never scored.
* Scored keys are the *private non-window* positions ``[P, N-w)``; score column ``i`` is
  absolute position ``P + i``.
* Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (the ``repeat_kv`` convention of HF
  transformers / SGLang).
* Inputs may be fp32, fp16 or bf16; everything is computed in fp32.

The composition used by the policies (:func:`attention_scores`) is::

    a   = window_attention_mean(queries, keys, start)     # [Hq, N-w-start], softmax over all N keys
    a   = pool_scores(a, kernel_size, pooling)            # same length
    a   = a[:, P-start:]                                  # drop the pooling halo -> [Hq, N-P-w]
    a  *= value_norm_factor(values, P, w)[kv_of(h)]       # LAVa only
    s   = reduce_gqa(a, Hkv, "max" | "mean")              # [Hkv, N-P-w]

``start = max(0, P - kernel_size // 2)``: the mean attention is computed for ``k // 2``
keys left of ``P`` as well, so pooling sees the same neighbours whatever ``P`` is. The
score of a private key is therefore independent of ``P`` (except for LAVa's value-norm
factor, which is taken over the private keys only); ``P`` only changes which keys are
eligible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_KEY_CHUNK",
    "window_attention_mean",
    "pool_scores",
    "value_norm_factor",
    "apply_value_norm",
    "reduce_gqa",
    "attention_scores",
    "layer_entropy",
]

# Keys per chunk when scoring. A chunk's attention is [Hq, w, chunk] fp32; the default
# model (Hq=9, w=32) at 8192 keys is 9.4 MB. Requests with N <= DEFAULT_KEY_CHUNK take
# the single-pass path (one [Hq, w, N] fp32 buffer, softmax in place).
DEFAULT_KEY_CHUNK = 8192


def _check_qk(queries: Tensor, keys: Tensor) -> tuple[int, int, int, int, int]:
    if queries.dim() != 3 or keys.dim() != 3:
        raise ValueError(f"queries must be [w, Hq, D] and keys [N, Hkv, D]; got {tuple(queries.shape)} and {tuple(keys.shape)}")
    w, hq, d = queries.shape
    n, hkv, dk = keys.shape
    if d != dk:
        raise ValueError(f"head_dim mismatch: queries {d}, keys {dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if w > n:
        raise ValueError(f"window ({w}) longer than the sequence ({n})")
    return w, hq, hkv, d, n


def _window_logits(q: Tensor, keys: Tensor, lo: int, hi: int, n: int, w: int, scale: float) -> Tensor:
    """Scaled logits of the grouped window queries ``q [Hkv, g*w, D]`` (fp32) against keys
    ``[lo, hi)``, with the causal mask inside the window applied. Returns ``[Hkv, g, w, hi-lo]``."""
    hkv, gw, d = q.shape
    k = keys[lo:hi].to(torch.float32).permute(1, 2, 0)  # [Hkv, D, hi-lo]
    logits = torch.matmul(q, k)  # [Hkv, g*w, hi-lo]
    logits.mul_(scale)
    logits = logits.view(hkv, gw // w, w, hi - lo)
    # window query i sits at position N-w+i and must not see keys j > N-w+i
    if hi > n - w:
        j = torch.arange(max(lo, n - w), hi, device=q.device)
        i = torch.arange(w, device=q.device)
        masked = j[None, :] > (n - w + i)[:, None]  # [w, cols]
        logits[..., max(lo, n - w) - lo :].masked_fill_(masked, float("-inf"))
    return logits


def window_attention_mean(
    queries: Tensor,
    keys: Tensor,
    prefix_len: int = 0,
    *,
    key_chunk: int | None = DEFAULT_KEY_CHUNK,
) -> Tensor:
    """Mean over the window queries of the softmax attention on each scored key.

    The ``w = queries.shape[0]`` window queries (positions ``N-w..N-1``) attend to all ``N``
    keys, causally inside the window; softmax in fp32 with scale ``1/sqrt(D)``; keys
    ``[0, prefix_len)`` count in the normalisation. Returns ``a [Hq, N - prefix_len - w]``
    fp32 with ``a[h, i]`` = mean over the ``w`` queries of the attention weight of query head
    ``h`` on key ``prefix_len + i`` (window keys are not scored).

    Memory: at most one ``[Hq, w, min(N, key_chunk)]`` fp32 buffer lives at a time. When
    ``N > key_chunk`` two passes are made (row log-sum-exp, then the weights chunk by chunk).
    ``key_chunk=None`` forces the single pass.
    """
    w, hq, hkv, d, n = _check_qk(queries, keys)
    if not 0 <= prefix_len <= n - w:
        raise ValueError(f"prefix_len={prefix_len} outside [0, N - w = {n - w}]")
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    # [w, Hq, D] -> [Hkv, g*w, D] (query head h = kvh*g + r); no repeat_kv copy of the keys
    q = queries.to(torch.float32).permute(1, 0, 2).reshape(hkv, g * w, d)
    out_len = n - w - prefix_len
    if out_len == 0:
        return queries.new_zeros((hq, 0), dtype=torch.float32)

    if key_chunk is None or n <= key_chunk:
        p = _window_logits(q, keys, 0, n, n, w, scale)  # [Hkv, g, w, N]
        # in-place softmax over the key axis (the only [Hq, w, N] buffer)
        p.sub_(p.amax(dim=-1, keepdim=True)).exp_()
        p.div_(p.sum(dim=-1, keepdim=True))
        a = p[..., prefix_len : n - w].mean(dim=2)  # [Hkv, g, out_len]
        return a.reshape(hq, out_len)

    # pass 1: log-sum-exp of every window row over all N keys, chunk by chunk
    lse = None
    for lo in range(0, n, key_chunk):
        hi = min(n, lo + key_chunk)
        part = torch.logsumexp(_window_logits(q, keys, lo, hi, n, w, scale), dim=-1)  # [Hkv, g, w]
        lse = part if lse is None else torch.logaddexp(lse, part)
    # pass 2: the weights of the scored keys [prefix_len, N-w)
    out = torch.empty((hkv, g, out_len), dtype=torch.float32, device=queries.device)
    for lo in range(prefix_len, n - w, key_chunk):
        hi = min(n - w, lo + key_chunk)
        p = _window_logits(q, keys, lo, hi, n, w, scale)
        p.sub_(lse[..., None]).exp_()
        out[..., lo - prefix_len : hi - prefix_len] = p.mean(dim=2)
    return out.reshape(hq, out_len)


def pool_scores(scores: Tensor, kernel_size: int, pooling: str = "max") -> Tensor:
    """Same-length 1-D pooling along the last axis, as SnapKV does.

    ``F.max_pool1d`` / ``F.avg_pool1d`` with ``padding = kernel_size // 2, stride = 1``
    (odd ``kernel_size``). Max pooling pads with ``-inf``; average pooling pads with zeros
    and divides by ``kernel_size`` at the edges too (``count_include_pad=True``, the
    PyTorch default every reference uses). ``kernel_size == 1`` is the identity.
    ``scores``: ``[H, n]`` fp32 -> ``[H, n]``.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if kernel_size == 1 or scores.shape[-1] == 0:
        return scores
    x = scores.unsqueeze(0)  # [1, H, n]
    if pooling == "max":
        y = F.max_pool1d(x, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    elif pooling == "avg":
        y = F.avg_pool1d(x, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; choose 'max' or 'avg'")
    return y.squeeze(0)


def value_norm_factor(values: Tensor, prefix_len: int, window: int) -> Tensor:
    """LAVa's per-head value-norm factor: ``max_j ||V[j, h]||_1`` over the private non-window
    positions ``j`` in ``[prefix_len, N - window)``. ``values [N, Hkv, D]`` -> ``[Hkv]`` fp32
    (zeros when that range is empty)."""
    n, hkv, _ = values.shape
    v = values[prefix_len : n - window]
    if v.shape[0] == 0:
        return values.new_zeros((hkv,), dtype=torch.float32)
    return v.to(torch.float32).abs().sum(dim=-1).amax(dim=0)


def apply_value_norm(scores: Tensor, factor: Tensor) -> Tensor:
    """Multiply query-head row ``h`` of ``scores [Hq, n]`` by ``factor[h // g]`` (``factor [Hkv]``)."""
    hq = scores.shape[0]
    hkv = factor.shape[0]
    return scores * factor.to(scores.dtype).repeat_interleave(hq // hkv)[:, None]


def reduce_gqa(scores: Tensor, n_kv_heads: int, mode: str) -> Tensor:
    """Reduce the ``g = Hq / Hkv`` query heads of each KV group to one row.

    ``scores [Hq, n]`` -> ``[Hkv, n]``; query heads ``kvh*g .. kvh*g+g-1`` form group ``kvh``.
    ``mode`` is ``"mean"`` (SnapKV, PyramidKV, AdaKV) or ``"max"`` (LAVa).
    """
    hq, n = scores.shape
    if hq % n_kv_heads != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({n_kv_heads})")
    grouped = scores.view(n_kv_heads, hq // n_kv_heads, n)
    if mode == "mean":
        return grouped.mean(dim=1)
    if mode == "max":
        return grouped.amax(dim=1)
    raise ValueError(f"unknown GQA reduction {mode!r}; choose 'mean' or 'max'")


def attention_scores(
    queries: Tensor,
    keys: Tensor,
    values: Tensor | None,
    prefix_len: int,
    *,
    kernel_size: int,
    pooling: str,
    gqa: str,
    value_norm: bool,
    key_chunk: int | None = DEFAULT_KEY_CHUNK,
) -> Tensor:
    """The whole scoring pipeline of one layer: ``[Hkv, N - prefix_len - w]`` fp32.

    window attention mean -> pooling (with a ``kernel_size // 2`` halo left of the prefix
    boundary, so pooling is independent of ``prefix_len``) -> [value-norm factor] -> GQA
    reduction. See the module docstring.
    """
    w, hq, hkv, d, n = _check_qk(queries, keys)
    start = max(0, prefix_len - kernel_size // 2)
    a = window_attention_mean(queries, keys, start, key_chunk=key_chunk)
    a = pool_scores(a, kernel_size, pooling)[:, prefix_len - start :]
    if value_norm:
        if values is None:
            raise ValueError("value_norm needs the values")
        a = apply_value_norm(a, value_norm_factor(values, prefix_len, w))
    return reduce_gqa(a.contiguous(), hkv, gqa)


def layer_entropy(scores: Tensor) -> float:
    """LAVa's normalised layer entropy.

    Flatten ``scores [Hkv, n]`` over (KV heads x tokens), normalise to a distribution ``p``,
    return ``H(p) / log(Hkv * n)`` in ``[0, 1]`` (``0 log 0 = 0``; computed in fp64).
    The normaliser is the log of the number of scored entries, as in the reference code
    (``np.log(attn_weights_mean_flat.shape[-1])``). Degenerate cases: a single entry
    -> 1.0; an all-zero row -> 1.0 (treated as uniform).
    """
    flat = scores.detach().reshape(-1).to(torch.float64)
    m = flat.numel()
    if m <= 1:
        return 1.0
    total = flat.sum()
    if not total > 0:
        return 1.0
    p = flat / total
    h = -torch.special.xlogy(p, p).sum()
    return float(h / math.log(m))
