"""Window-attention scores of one layer for a batch of requests (DESIGN.md section 2, steps 1-5).

For request ``r`` with ``N`` positions (keys read from the KV pool through a list of slots),
``w`` window queries (positions ``N-w .. N-1``, post-RoPE) and shared prefix ``P``, the
result is the policies' score ``[Hkv, N - P - w]`` fp32 of the private non-window keys,
exactly :func:`lava_sglang.policies.scoring.attention_scores`:

    window attention mean (softmax in fp32, scale 1/sqrt(D), causal inside the window,
    prefix keys in the normalisation) -> same-length pooling (halo ``k//2`` left of ``P``)
    -> [LAVa: x max ||V||_1 of the head over [P, N-w)] -> GQA reduction ("mean" | "max")

Implementations (``impl``, see :mod:`.dispatch`):

* ``"torch"`` (:func:`window_scores_torch`): a loop over requests calling
  :func:`~lava_sglang.policies.scoring.attention_scores` on the gathered keys/values
  (the policies' own code is the reference; nothing re-implemented).
* ``"triton"`` (:mod:`._triton_window_scores`): three launches per layer for the whole
  batch, never materialising ``[Hq, w, N]``:

  1. row statistics: grid ``(R, Hkv, splits)``; each program holds the ``g x w`` window
     rows of one KV group and runs an online max / sum-exp over its piece of the keys,
     causal mask included (same rows, split over keys, merged in step 2); with LAVa it also
     takes the max L1 norm of the values of its private non-window keys;
  2. mean attention: grid ``(R, Hkv, key tiles)`` over the scored keys and the pooling
     halo; recomputes the logits of a tile, normalises with the merged statistics and
     averages over the window rows -> ``[Hq, n_ext]`` fp32 per request (scratch);
  3. pooling + value-norm factor + GQA reduction fused: grid ``(R, Hkv, tiles)``; pooling
     reads its ``k`` neighbours from the scratch of step 2 (a tile cannot see its
     neighbours' registers, hence the separate launch).

  Memory: ``O(R x Hkv x splits x g x w)`` statistics plus ``O(Hq x N)`` fp32 per request.

The keys come from the layer's KV pool ``[slots, Hkv, D]`` (``k_buffer[l]``) through
``key_slots`` (position ``j`` of request ``r`` is slot ``key_slots[key_indptr[r] + j]``),
so nothing is gathered on the GPU path. For contiguous keys pass the ``[N, Hkv, D]``
tensor and ``torch.arange(N)``.

Engine-free: never imports SGLang.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..policies.scoring import DEFAULT_KEY_CHUNK, attention_scores
from .dispatch import resolve_impl

__all__ = ["window_scores", "window_scores_torch"]


def _lists(q_indptr, key_indptr, prefix_lens):
    qi = [int(x) for x in torch.as_tensor(q_indptr).tolist()]
    ki = [int(x) for x in torch.as_tensor(key_indptr).tolist()]
    P = [int(x) for x in torch.as_tensor(prefix_lens).reshape(-1).tolist()]
    R = len(qi) - 1
    if len(ki) != R + 1 or len(P) != R:
        raise ValueError(f"q_indptr ({len(qi)}), key_indptr ({len(ki)}) and prefix_lens ({len(P)}) disagree on the batch size")
    w = [qi[r + 1] - qi[r] for r in range(R)]
    N = [ki[r + 1] - ki[r] for r in range(R)]
    for r in range(R):
        if w[r] > N[r]:
            raise ValueError(f"request {r}: window ({w[r]}) longer than the sequence ({N[r]})")
        if not 0 <= P[r] <= N[r]:
            raise ValueError(f"request {r}: prefix_len {P[r]} outside [0, {N[r]}]")
    return qi, ki, P, w, N


def _check(gqa: str, pooling: str, kernel_size: int, value_norm: bool, v_buffer):
    if gqa not in ("mean", "max"):
        raise ValueError(f"unknown GQA reduction {gqa!r}; choose 'mean' or 'max'")
    if pooling not in ("max", "avg"):
        raise ValueError(f"unknown pooling {pooling!r}; choose 'max' or 'avg'")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if value_norm and v_buffer is None:
        raise ValueError("value_norm needs the values")


def window_scores_torch(
    q_win: Tensor,
    q_indptr: Tensor,
    k_buffer: Tensor,
    v_buffer: Tensor | None,
    key_slots: Tensor,
    key_indptr: Tensor,
    prefix_lens: Sequence[int] | Tensor,
    *,
    kernel_size: int,
    pooling: str,
    gqa: str,
    value_norm: bool,
    key_chunk: int | None = DEFAULT_KEY_CHUNK,
) -> list[Tensor]:
    """Torch twin: per request, gather keys/values and call the policies' ``attention_scores``."""
    _check(gqa, pooling, kernel_size, value_norm, v_buffer)
    qi, ki, P, w, N = _lists(q_indptr, key_indptr, prefix_lens)
    hkv = k_buffer.shape[1]
    out = []
    for r in range(len(P)):
        n_scored = N[r] - P[r] - w[r]
        if n_scored <= 0:
            out.append(torch.zeros((hkv, 0), dtype=torch.float32, device=q_win.device))
            continue
        slots = key_slots[ki[r]: ki[r + 1]].to(device=k_buffer.device, dtype=torch.long)
        keys = k_buffer.index_select(0, slots)
        values = v_buffer.index_select(0, slots) if value_norm else None
        out.append(attention_scores(
            q_win[qi[r]: qi[r + 1]], keys, values, P[r],
            kernel_size=kernel_size, pooling=pooling, gqa=gqa, value_norm=value_norm, key_chunk=key_chunk,
        ))
    return out


def window_scores(
    q_win: Tensor,
    q_indptr: Tensor,
    k_buffer: Tensor,
    v_buffer: Tensor | None,
    key_slots: Tensor,
    key_indptr: Tensor,
    prefix_lens: Sequence[int] | Tensor,
    *,
    kernel_size: int = 7,
    pooling: str = "max",
    gqa: str = "mean",
    value_norm: bool = False,
    impl: str = "auto",
) -> list[Tensor]:
    """Scores of one layer for a batch of ``R`` requests; one ``[Hkv, N_r - P_r - w_r]`` fp32
    tensor per request (``[Hkv, 0]`` when nothing is scored).

    * ``q_win [sum w_r, Hq, D]``: window queries, request-major; ``q_indptr [R + 1]``.
    * ``k_buffer`` / ``v_buffer [slots, Hkv, D]``: the layer's keys / values (``v_buffer``
      may be ``None`` unless ``value_norm``).
    * ``key_slots [sum N_r]``: slot of every position ``0 .. N_r - 1`` of every request;
      ``key_indptr [R + 1]``.
    * ``prefix_lens [R]``: shared prefix ``P_r`` (scored keys are ``[P_r, N_r - w_r)``).
    * ``kernel_size`` / ``pooling`` / ``gqa`` / ``value_norm``: as the policy's config
      (SnapKV/PyramidKV/AdaKV: ``gqa="mean"``; LAVa: ``gqa="max", value_norm=True``).
    """
    if q_win.dim() != 3 or k_buffer.dim() != 3:
        raise ValueError(f"q_win must be [sum w, Hq, D] and k_buffer [slots, Hkv, D]; got {tuple(q_win.shape)}, {tuple(k_buffer.shape)}")
    hq, hkv = q_win.shape[1], k_buffer.shape[1]
    if hq % hkv != 0 or q_win.shape[2] != k_buffer.shape[2]:
        raise ValueError(f"incompatible shapes: q_win {tuple(q_win.shape)}, k_buffer {tuple(k_buffer.shape)}")
    which = resolve_impl("window_scores", k_buffer.device, impl)
    kw = dict(kernel_size=kernel_size, pooling=pooling, gqa=gqa, value_norm=value_norm)
    if which == "torch":
        return window_scores_torch(q_win, q_indptr, k_buffer, v_buffer, key_slots, key_indptr, prefix_lens, **kw)
    _check(gqa, pooling, kernel_size, value_norm, v_buffer)
    from ._triton_window_scores import window_scores_triton

    return window_scores_triton(q_win, q_indptr, k_buffer, v_buffer, key_slots, key_indptr,
                                _lists(q_indptr, key_indptr, prefix_lens), **kw)
