"""Prometheus metrics for compression (with SGLang's ``--enable-metrics``), next to SGLang's own.

Created lazily in the scheduler process, after SGLang has set ``PROMETHEUS_MULTIPROC_DIR``, so
SGLang's ``/metrics`` endpoint aggregates them like its own scheduler metrics. Labelled by policy.
"""

from __future__ import annotations

_enabled = False
_metrics = None


def enable(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


def _get():
    global _metrics
    if _metrics is None:
        from prometheus_client import Counter, Gauge, Histogram

        # The same events as /server_info's totals (engine.report), under the same names.
        _metrics = {
            "requests": Counter("sglang:lava_compressed_requests_total",
                                "Requests whose prompt was compressed (counted once, at the selection that completes it)",
                                ["policy"]),
            "selections": Counter("sglang:lava_selections_total",
                                  "Selections: after a prefill chunk, after a prompt, of a continued turn", ["policy"]),
            "reselections": Counter("sglang:lava_reselections_total",
                                    "Selections of a continued turn over its compressed history", ["policy"]),
            "kept": Counter("sglang:lava_kept_cells_total",
                            "KV cells (layer x head x token) kept by compressed requests' prompt selections", ["policy"]),
            "freed": Counter("sglang:lava_freed_slots_total", "Token slots returned to the allocator by selections",
                             ["policy"]),
            "ratio": Histogram("sglang:lava_kept_ratio",
                               "Kept cells / private cells of a compressed request (kvpress's compression_ratio is 1 - this)",
                               ["policy"], buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)),
            "seconds": Histogram("sglang:lava_compression_seconds", "Time of one selection: score, select, repack, free",
                                 ["policy"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)),
            # parked conversations (engine.parking)
            "parked": Gauge("sglang:lava_parked_conversations", "Parked compressed conversations (idle or borrowed)",
                            multiprocess_mode="mostrecent"),
            "parked_slots": Gauge("sglang:lava_parked_slots", "KV slots held by parked conversations",
                                  multiprocess_mode="mostrecent"),
            "parked_cap": Gauge("sglang:lava_parked_max_conversations", "The cap on parked conversations in force",
                                multiprocess_mode="mostrecent"),
            "park_hits": Counter("sglang:lava_park_hits_total", "Requests that continued a parked conversation"),
            "park_misses": Counter("sglang:lava_park_misses_total", "Requests with parking on that found no parked conversation"),
            "park_evictions": Counter("sglang:lava_park_evictions_total", "Parked conversations evicted for memory or the cap"),
        }
    return _metrics


def selection(report: dict) -> None:
    """One selection, where it happens (a prefill chunk's, a prompt's, a continued turn's)."""
    if not _enabled:
        return
    m, policy = _get(), report["policy"]
    m["selections"].labels(policy=policy).inc()
    m["freed"].labels(policy=policy).inc(report["slots_freed"])
    m["seconds"].labels(policy=policy).observe(report["compression_ms"] / 1000)


def compressed(report: dict, first: bool) -> None:
    """A request's prompt compressed (``first``) or a continued turn re-selected."""
    if not _enabled:
        return
    m, policy = _get(), report["policy"]
    if first:
        m["requests"].labels(policy=policy).inc()
        m["kept"].labels(policy=policy).inc(report["kept_cells"])
        m["ratio"].labels(policy=policy).observe(report["kept_cells"] / max(1, report["private_cells"]))
    else:
        m["reselections"].labels(policy=policy).inc()


def parking(snapshot: dict, event: str | None = None) -> None:
    """Parked-conversation gauges, and one ``event`` counter (``hits``, ``misses``, ``evictions``)."""
    if not _enabled:
        return
    m = _get()
    m["parked"].set(snapshot["parked_conversations"])
    m["parked_slots"].set(snapshot["parked_slots"])
    m["parked_cap"].set(snapshot["park_max_conversations"])
    if event is not None:
        m[f"park_{event}"].inc()
