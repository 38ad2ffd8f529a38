"""Settings compression cannot run with, checked in the scheduler on the resolved config."""

from __future__ import annotations

from typing import Any


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
