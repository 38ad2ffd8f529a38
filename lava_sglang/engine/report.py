"""What a compression (or a re-selection) reports: the totals, the Prometheus metrics, the
response's ``meta_info["kv_compression"]``, the log line and the debug invariants; and the nudge
that lets the scheduler admit again into the memory compression just freed. No SGLang import at
module level.
"""

from __future__ import annotations

import logging

from lava_sglang.engine import metrics
from lava_sglang.engine.accounting import debug_check
from lava_sglang.engine.state import REGISTRY

logger = logging.getLogger("lava_sglang")

META_KEY = "kv_compression"
STREAMER = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"


def memory_freed() -> None:
    """Let the scheduler try to admit again: SGLang marks the running batch full when a prefill
    did not fit and clears the mark only when a request finishes. Compression returns slots at
    once, so without this the freed memory would sit idle until the next request finished."""
    running = getattr(REGISTRY.scheduler, "running_batch", None)
    if running is not None:
        running.batch_is_full = False


def attach(req, report: dict) -> None:
    """``meta_info["kv_compression"] = [report]`` (a note about parked conversations is kept)."""
    if req.customized_info is None:
        req.customized_info = {}
    earlier = (req.customized_info.get(META_KEY) or [{}])[0]
    note = {"parked": earlier["parked"]} if isinstance(earlier, dict) and "parked" in earlier else {}
    req.customized_info[META_KEY] = [dict(report, **note)]


def count_selection(report: dict) -> None:
    """One selection, counted where it happens (after a prefill chunk, ``engine.chunked``, after a
    prompt, of a continued turn): ``selections``, the slots it freed and its time, in the totals
    and ``/metrics`` at once; and the scheduler nudged to admit into the freed slots."""
    memory_freed()
    REGISTRY.totals["selections"] += 1
    REGISTRY.totals["freed_slots"] += report["slots_freed"]
    REGISTRY.totals["compression_seconds"] += report["compression_ms"] / 1000
    metrics.selection(report)


def record(worker, req, report: dict, first: bool, selected: bool = True) -> None:
    """Everything one compression (``first``) or re-selection of a continued turn reports
    (``selected``: false for a prompt compressed chunk by chunk whose last chunk needed no
    selection; its selections were counted as they happened)."""
    if selected:
        count_selection(report)
    totals = REGISTRY.totals
    if first:
        totals["compressed_requests"] += 1
        totals["kept_cells"] += report["kept_cells"]
    else:
        totals["reselections"] += 1
    metrics.compressed(report, first)
    attach(req, report)
    r = report
    chunked = (f" chunked: {r['chunk_selections']} selections, peak_slots={r['peak_slots']}, "
               f"{r['compression_ms_total']:.1f} ms in all (prefill {r['prefill_ms_total']:.1f} ms), "
               f"freed {r['slots_freed_total']} in all" if r.get("prefill_compression") == "chunked" else "")
    logger.info("lava-sglang: %s %s: policy=%s prompt=%d shared=%d kept_cells=%d slots_held=%d freed=%d "
                "packing=%.2f %.1f ms (prefill %.1f ms)%s%s", "compressed" if first else "re-selected", req.rid,
                r["policy"], r["prompt_tokens"], r["shared_prefix_tokens"], r["kept_cells"], r["slots_held"],
                r["slots_freed"], r["packing_efficiency"], r["compression_ms"], r["prefill_ms"],
                "" if first else f" turn {r.get('turn')}, earlier kept cells dropped {r.get('earlier_kept_cells_dropped')}",
                chunked)
    debug_check(worker)


def around_is_request_level_key(original, self, key):
    return key == META_KEY or original(self, key)


HOOKS = [
    (f"{STREAMER}.is_request_level_customized_info_key", around_is_request_level_key, "AROUND", True),
]
