"""Settings and models compression cannot run with, checked in the scheduler: the resolved config
(``unsupported_settings``) before the model loads, the model's attention layers and KV pool
(``unsupported_model``) once it has. Each reason is one line of the start-up refusal. No SGLang
import."""

from __future__ import annotations

from typing import Any

from lava_sglang.kernels import dispatch


# --kv-cache-dtype values that keep the model's float types (SGLang's choices add fp8 and fp4 ones)
FLOAT_KV_DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "half", "fp32", "float32", "float")


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def unsupported_settings(cfg: Any) -> list[str]:
    """Human-readable reasons why compression cannot run with ``cfg`` (a resolved server config)."""
    problems = []
    if (getattr(cfg, "tp_size", 1) or 1) > 1:
        problems.append(f"tensor parallelism (--tp-size {cfg.tp_size}; per-head budgets would need a cross-rank agreement)")
    if (getattr(cfg, "pp_size", 1) or 1) > 1:
        problems.append(f"pipeline parallelism (--pp-size {cfg.pp_size})")
    spec = getattr(cfg, "speculative_algorithm", None)
    if spec not in (None, "", "NONE", "none"):
        problems.append(f"speculative decoding (--speculative-algorithm {spec})")
    if (getattr(cfg, "page_size", 1) or 1) > 1:
        problems.append(f"page size > 1 (--page-size {cfg.page_size}; compressed caches are per-token)")
    if getattr(cfg, "enable_hierarchical_cache", False):
        problems.append("hierarchical cache (--enable-hierarchical-cache)")
    if getattr(cfg, "enable_mixed_chunk", False):
        problems.append("mixed chunk (--enable-mixed-chunk)")
    kv_dtype = str(_value(getattr(cfg, "kv_cache_dtype", "auto")) or "auto")
    if kv_dtype.lower() not in FLOAT_KV_DTYPES:
        problems.append(f"a quantized KV cache (--kv-cache-dtype {kv_dtype}; compression moves and reads KV vectors "
                        "without their scales: use auto, bf16 or the model's float type)")
    if str(_value(getattr(cfg, "schedule_policy", "fcfs")) or "fcfs") == "dfs-weight":
        problems.append("--schedule-policy dfs-weight (SGLang's dfs-weight sort raises on the virtual tree node of a "
                        "request that continues a parked conversation or a session, and the scheduler dies)")
    try:  # a bad value would otherwise fail every compressed request's attention
        dispatch.forced_impl()
    except ValueError as exc:
        problems.append(str(exc))
    pd = str(_value(getattr(cfg, "disaggregation_mode", "null")) or "null")
    if pd.lower() not in ("null", "none"):
        problems.append(f"PD disaggregation (--disaggregation-mode {pd}; a prefill server would ship a repacked, "
                        "compressed row the decode server cannot read)")
    # CUDA graphs: a replay runs the captured kernels, not the attention the plugin wraps. The
    # plugin turns both phases off unless asked (server_args_patch.adjust_server_args); what is
    # still on here was asked for explicitly.
    graphs = getattr(cfg, "cuda_graph_config", None)
    if getattr(cfg, "device", "cuda") not in ("cpu",):
        for phase in ("decode", "prefill"):
            backend = _value(getattr(getattr(graphs, phase, None), "backend", "disabled"))
            if backend not in (None, "disabled"):
                problems.append(f"{phase} CUDA graphs (backend {backend}, asked for explicitly; a graph replay would "
                                f"bypass compression: drop --cuda-graph-backend-{phase} / the --cuda-graph-config "
                                f"entry, or pass --disable-{phase}-cuda-graph)")
    return problems


def attention_layers(model) -> list:
    """The attention layers of ``model`` (SGLang's ``RadixAttention``: a ``layer_id``, a
    ``logit_cap`` and a ``sliding_window_size``), found by those attributes."""
    modules = model.modules() if hasattr(model, "modules") else []
    return [m for m in modules if all(hasattr(m, a) for a in ("layer_id", "logit_cap", "sliding_window_size"))]


def unsupported_model(layers, hybrid_swa: bool = False) -> list[str]:
    """Why compression cannot run with a model whose attention layers are ``layers``: the
    compressed attention path (``engine.layout``) applies only ``scaling``, so a logit soft-cap
    or a sliding window would be ignored and the output wrong; a hybrid SWA pool is not one
    token-major allocation."""
    problems = []
    capped = sorted({int(m.layer_id) for m in layers if float(getattr(m, "logit_cap", 0) or 0) > 0})
    if capped:
        cap = next(float(m.logit_cap) for m in layers if int(m.layer_id) == capped[0])
        problems.append(f"attention logit soft-capping (logit_cap {cap:g} in {len(capped)} layer(s), e.g. Gemma-2; the "
                        "compressed attention does not apply it)")
    windowed = sorted({int(m.layer_id) for m in layers if int(getattr(m, "sliding_window_size", -1) or -1) > 0})
    if windowed:
        size = next(int(m.sliding_window_size) for m in layers if int(m.layer_id) == windowed[0])
        problems.append(f"sliding-window attention (window {size} in {len(windowed)} layer(s), e.g. Gemma-2/3, Mistral; "
                        "the compressed attention does not apply it)")
    if hybrid_swa and not windowed:
        problems.append("a hybrid sliding-window KV pool (the compressed layout needs one full-attention pool)")
    return problems
