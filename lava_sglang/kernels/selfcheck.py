"""Start-up self-check of the GPU kernel back-ends, with fallback; also their warm-up.

None of the GPU paths (FlashInfer, compiled Triton) has been run on a GPU by this project, so a
server checks them before it serves: :func:`run_selfcheck` runs each back-end the automatic
dispatch would pick (:func:`.dispatch.gpu_candidates`: FlashInfer then Triton for decode and
extend attention, Triton for repack) once, on a small synthetic batch built like the engine's
(three requests, two KV heads: a compressed request with a shared prefix and per-head lists of
different lengths, an uncompressed one, a compressed one without prefix; a few decode or new
tokens each), through the same entry points the engine calls (``DecodePlan``, ``ExtendPlan``,
``repack_cells``), and compares the result with the torch twin run on CPU copies of the same
tensors: ``allclose`` within :data:`TOLERANCE` of the KV dtype for attention, bit-equality for
repack. The first candidate that passes is the one in use; the ones after it are not run.

A candidate that raises or disagrees is disabled (:func:`.dispatch.disable`), with one warning
line, and the automatic choice falls back to the next one, finally torch. A back-end forced
with ``LAVA_KERNEL_IMPL`` is checked too, and if it fails :class:`SelfCheckError` is raised
(the server refuses to start, naming the variable) instead of silently overriding it.

The first run of a back-end compiles it (Triton JIT, FlashInfer JIT) for the model's head size,
group size and KV dtype, so this is also the warm-up, done before the server reports healthy
(other Triton split counts compile on first use). On CPU tensors the Triton kernels run in
Triton's interpreter.

When it runs (:func:`should_run`): on CUDA, unless ``LAVA_SGLANG_SELFCHECK=0``; elsewhere only
with ``LAVA_SGLANG_SELFCHECK=1`` (for tests; it then checks the Triton interpreter).

Engine-free: never imports SGLang.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

from . import dispatch
from .decode_attention import DecodePlan, paged_decode_attention_torch
from .extend_attention import ExtendPlan, paged_extend_attention_torch
from .pair_indices import PairIndices, build_pair_indices_from_lists
from .repack import repack_cells, repack_cells_torch

logger = logging.getLogger("lava_sglang")

ENV_VAR = "LAVA_SGLANG_SELFCHECK"
OPS = ("decode", "extend", "repack")
#: (atol, rtol) of an attention back-end against the torch twin, per KV dtype: about twice the
#: kernel tests' tolerances against an fp32 reference (a wrong mask or index is off by ~0.1-1)
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (6e-3, 6e-3), torch.bfloat16: (5e-2, 4e-2)}
_OTHER_TOLERANCE = (1e-1, 1e-1)


class SelfCheckError(RuntimeError):
    """A back-end forced with ``LAVA_KERNEL_IMPL`` failed its self-check."""


class _Case(NamedTuple):
    """A synthetic batch on CPU: pair lists, decode and extend queries, K/V cells, repack moves."""

    pairs: PairIndices
    qo_indptr: Tensor
    q_decode: Tensor  # [n_pairs, g, D]
    q_extend: Tensor  # [nq_total, g, D]
    k: Tensor  # [cells, D]
    v: Tensor
    src: Tensor  # repack: kept cells of one request ...
    dst: Tensor  # ... packed into the first cells of its range (overlapping)
    scale: float


def make_case(head_dim: int, group_size: int, dtype: torch.dtype, *, n_kv_heads: int = 2, seed: int = 0) -> _Case:
    """The self-check's batch (see the module docstring); deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    H, g, D = int(n_kv_heads), int(group_size), int(head_dim)
    slots = 256
    perm = torch.randperm(slots - 1, generator=gen) + 1  # slot 0 is SGLang's padding slot

    def take(n):
        nonlocal perm
        out, perm = perm[:n], perm[n:]
        return out

    def kept(lens):  # per-head compressed cells: absolute cell ids slot * H + h, lengths differ
        return [take(n) * H + h for h, n in enumerate(lens)]

    # (shared prefix slots, compressed cells per head or None, new / decode token slots)
    prefix = [take(8), take(12), torch.zeros(0, dtype=torch.long)]
    mids = [kept([37, 11][:H] + [5] * max(0, H - 2)), None, kept([3, 70][:H] + [9] * max(0, H - 2))]
    suffix = [take(5), take(9), take(4)]
    pairs = build_pair_indices_from_lists(H, prefix, mids, suffix, index_dtype=torch.int32)
    qo_lens = torch.tensor([int(s.numel()) for s in suffix]).repeat_interleave(H)
    qo_indptr = torch.zeros(qo_lens.numel() + 1, dtype=torch.int32)
    qo_indptr[1:] = qo_lens.cumsum(0)
    n_pairs, nq = pairs.n_pairs, int(qo_lens.sum())
    q_decode = torch.randn(n_pairs, g, D, generator=gen).to(dtype)
    q_extend = torch.randn(nq, g, D, generator=gen).to(dtype)
    k = torch.randn(slots * H, D, generator=gen).to(dtype)
    v = torch.randn(slots * H, D, generator=gen).to(dtype)
    # repack as compression does it: a request's kept cells (sorted) into the first cells of its range
    start = 40 * H
    src = start + torch.sort(torch.randperm(30 * H, generator=gen)[:17 * H]).values
    dst = start + torch.arange(src.numel())
    return _Case(pairs, qo_indptr, q_decode, q_extend, k, v, src, dst, 1 / math.sqrt(D))


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _on(device: torch.device, *tensors: Tensor) -> list[Tensor]:
    return [t.to(device) for t in tensors]


def _compare(out: Tensor, ref: Tensor, dtype: torch.dtype) -> str | None:
    out = out.detach().float().cpu()
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return "non-finite values"
    atol, rtol = TOLERANCE.get(dtype, _OTHER_TOLERANCE)
    if not torch.allclose(out, ref, atol=atol, rtol=rtol):
        return f"max |diff| {float((out - ref).abs().max()):.3g} against the torch twin (atol {atol:g}, rtol {rtol:g})"
    return None


def _check_decode(impl: str, device: torch.device, c: _Case) -> str | None:
    ref = paged_decode_attention_torch(c.q_decode, c.k, c.v, *c.pairs, c.scale).float()
    q, k, v, indptr, indices = _on(device, c.q_decode, c.k, c.v, *c.pairs)
    plan = DecodePlan(device, q.shape[-1], k.dtype, impl=impl).plan({0: PairIndices(indptr, indices)})
    return _compare(plan.run(0, q, k, v, c.scale), ref, c.k.dtype)


def _check_extend(impl: str, device: torch.device, c: _Case) -> str | None:
    ref = paged_extend_attention_torch(c.q_extend, c.k, c.v, c.qo_indptr, *c.pairs, c.scale).float()
    q, k, v, qo, indptr, indices = _on(device, c.q_extend, c.k, c.v, c.qo_indptr, *c.pairs)
    plan = ExtendPlan(qo, q.shape[0], device, (q.shape[1], q.shape[2], v.shape[-1]), k.dtype, impl=impl)
    return _compare(plan.plan({0: PairIndices(indptr, indices)}).run(0, q, k, v, c.scale), ref, c.k.dtype)


def _check_repack(impl: str, device: torch.device, c: _Case) -> str | None:
    k_ref, v_ref = c.k.clone(), c.v.clone()
    repack_cells_torch(k_ref, v_ref, c.src, c.dst)
    k, v, src, dst = _on(device, c.k, c.v, c.src, c.dst)
    repack_cells(k, v, src, dst, impl=impl)
    if not (torch.equal(k.cpu(), k_ref) and torch.equal(v.cpu(), v_ref)):
        bad = int((k.cpu() != k_ref).any(dim=-1).sum() + (v.cpu() != v_ref).any(dim=-1).sum())
        return f"{bad} cells differ from the torch twin's repack"
    return None


_CHECKS = {"decode": _check_decode, "extend": _check_extend, "repack": _check_repack}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_one(op: str, impl: str, device: torch.device, case: _Case) -> str | None:
    """None when ``impl`` of ``op`` agrees with the torch twin, else why not (exceptions included)."""
    try:
        why = _CHECKS[op](impl, device, case)
        _sync(device)
        return why
    except Exception as exc:  # a back-end that cannot run is a failed check, not a crash
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _candidates(op: str, device: torch.device, kv_dtype: torch.dtype) -> tuple[list[str], bool]:
    """(implementations to check in order, whether forced with ``LAVA_KERNEL_IMPL``)."""
    forced = dispatch.forced_impl()
    if forced:
        try:
            impl = dispatch.resolve_impl(op, device, forced, dtype=kv_dtype)
        except ValueError as exc:
            raise SelfCheckError(f"lava-sglang: {dispatch.ENV_VAR}={forced}: {exc}") from exc
        return ([] if impl == "torch" else [impl]), True
    if device.type == "cuda":
        return dispatch.gpu_candidates(op, kv_dtype), False
    return ["triton"], False  # CPU (forced self-check, for tests): the Triton interpreter


def run_selfcheck(device, kv_dtype: torch.dtype, *, head_dim: int = 128, group_size: int = 4,
                  candidates: dict | None = None, ops=OPS) -> dict:
    """Check the back-ends of ``ops`` on ``device`` for a ``kv_dtype`` cache (queries of the
    same dtype), ``head_dim`` and ``group_size`` query heads per KV head; disable the ones that
    fail (see the module docstring). ``candidates``: ``{op: [impl, ...]}`` to check instead of
    dispatch's (tests). Returns :func:`report` with, per op, ``checks`` ({impl: "ok" or
    "failed: why"}) and ``ms`` (the op's checks, compilation included), and the total ``ms``.
    Raises :class:`SelfCheckError` when a forced back-end fails."""
    device = torch.device(device)
    t_all = time.perf_counter()
    case = make_case(head_dim, group_size, kv_dtype)
    checks, times = {}, {}
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for op in ops:
            todo, forced = (list(candidates.get(op, [])), False) if candidates is not None else _candidates(op, device, kv_dtype)
            checks[op], t0 = {}, time.perf_counter()
            for impl in todo:
                if (op, impl) in dispatch.disabled():
                    checks[op][impl] = "disabled: " + dispatch.disabled()[(op, impl)]
                    continue
                why = _run_one(op, impl, device, case)
                checks[op][impl] = "ok" if why is None else "failed: " + why
                if why is None:
                    break
                where = f"{device} {_name(kv_dtype)} (head_dim {head_dim}, group {group_size})"
                if forced:
                    raise SelfCheckError(f"lava-sglang: kernel self-check: {op} '{impl}', forced with {dispatch.ENV_VAR}, "
                                         f"failed on {where}: {why}; unset {dispatch.ENV_VAR} to let the plugin fall back")
                dispatch.disable(op, impl, why)
                logger.warning("lava-sglang: kernel self-check: %s '%s' failed on %s: %s; %s falls back to '%s'", op, impl,
                               where, why, op, dispatch.resolve_impl(op, device, dtype=kv_dtype))
            times[op] = round((time.perf_counter() - t0) * 1000, 1)
    result = report(device, kv_dtype, ops)
    for op in ops:
        result[op].update(checks=checks[op], ms=times[op])
    result["selfcheck"] = "ran"
    result["ms"] = round((time.perf_counter() - t_all) * 1000, 1)
    logger.info("lava-sglang: kernel self-check on %s, %s: %s (%.0f ms)", device, _name(kv_dtype),
                ", ".join(f"{op} {result[op]['impl']}" for op in ops), result["ms"])
    return result


def report(device, kv_dtype: torch.dtype | None, ops=OPS) -> dict:
    """The implementation each op resolves to now on ``device`` (what ``/server_info`` shows
    as ``kv_kernels``), without running anything. A bad ``LAVA_KERNEL_IMPL`` raises
    :class:`SelfCheckError` (the server refuses to start with one line)."""
    device = torch.device(device)
    try:
        out = {op: {"impl": dispatch.resolve_impl(op, device, dtype=kv_dtype)} for op in ops}
    except ValueError as exc:
        raise SelfCheckError(f"lava-sglang: {exc}") from exc
    out.update(device=str(device), kv_dtype=_name(kv_dtype), selfcheck="not run")
    return out


def should_run(device) -> bool:
    """On CUDA unless ``LAVA_SGLANG_SELFCHECK=0``; elsewhere only with ``LAVA_SGLANG_SELFCHECK=1``."""
    value = os.environ.get(ENV_VAR, "").strip()
    return value == "1" or (torch.device(device).type == "cuda" and value != "0")


def startup_report(device, kv_dtype: torch.dtype, *, head_dim: int, group_size: int) -> dict:
    """:func:`run_selfcheck` when :func:`should_run`, else :func:`report` (the server's start-up)."""
    if should_run(device):
        return run_selfcheck(device, kv_dtype, head_dim=head_dim, group_size=group_size)
    return report(device, kv_dtype)
