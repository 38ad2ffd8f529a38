"""The serving benchmark's ``--quick`` run end to end (two real servers, same pool and workload),
and the SGLang log parsing it shares with the demo and the multi-turn benchmark (no server).

The quick run checks that every metric the issue asks for is measured and written (JSON, table,
plot), and that the engine-side numbers are consistent with the workload; it sets no performance
threshold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lava_sglang import sglang_log  # noqa: E402

METRICS = ("request_throughput", "output_throughput", "decode_phase_throughput", "ttft_p50", "ttft_p99", "itl_p50",
           "itl_p99", "peak_running_requests", "peak_kv_usage", "retractions", "decode_step_s")

LOG = """\
[2026-01-01 00:00:00] Prefill batch, #new-seq: 2, #new-token: 1200, #cached-token: 5, token usage: 0.10, #queue-req: 0
[2026-01-01 00:00:01] Decode batch, #running-req: 2, #token: 1210, token usage: 0.19, cuda graph: False, gen throughput (token/s): 4.00, #queue-req: 0
[2026-01-01 00:00:02] Decode batch, #running-req: 2, #token: 1212, token usage: 0.20, cuda graph: False, gen throughput (token/s): 8.00, #queue-req: 0
[2026-01-01 00:00:03] Prefill batch, #new-seq: 1, #new-token: 600, #cached-token: 0, token usage: 0.25, #queue-req: 0
[2026-01-01 00:00:04] Decode batch, #running-req: 3, #token: 1815, token usage: 0.31, cuda graph: False, gen throughput (token/s): 6.00, #queue-req: 0
[2026-01-01 00:00:05] Decode batch, #running-req: 3, #token: 1818, token usage: 0.30, cuda graph: False, gen throughput (token/s): 0.00, #queue-req: 0
[2026-01-01 00:00:06] Decode batch, #running-req: 2, #token: 1820, token usage: 0.21, cuda graph: False, gen throughput (token/s): 10.00, #queue-req: 0
"""


def test_log_parsing():
    """Decode batches, pure decode steps (a decode line right after another, positive throughput),
    step times at a batch size, peaks and prefill batches, from scheduler lines as SGLang logs them."""
    batches = sglang_log.decode_batches(LOG)
    assert [(d.running, d.tokens, d.usage, d.throughput) for d in batches][0] == (2, 1210, 0.19, 4.0)
    assert len(batches) == 5 and sglang_log.peak_running(batches) == 3 and sglang_log.peak_usage(batches) == 0.31
    steps = sglang_log.decode_steps(LOG)
    assert [(d.running, d.throughput) for d in steps] == [(2, 8.0), (2, 10.0)]  # not after a prefill, not 0 tok/s
    assert [d.step_s for d in steps] == [0.25, 0.2]
    assert sglang_log.step_times(LOG, 2) == [0.5, 0.25, 0.2] and sglang_log.step_times(LOG, 3) == [0.5]
    assert sglang_log.prefill_batches(LOG) == [(2, 1200, 5), (1, 600, 0)]
    assert sglang_log.peak_running([], default=None) is None and sglang_log.peak_usage([], default=0.0) == 0.0


@pytest.mark.server
def test_quick_serving_run_writes_every_metric(tmp_path):
    from benchmarks.serving import main

    assert main(["--quick", "--configs", "none", "lava:64", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "serving.json").read_text())
    assert set(data["results"]) == {"none", "lava:64"}
    for name, r in data["results"].items():
        for key in METRICS:
            assert r[key] is not None, (name, key)
        assert r["output_throughput"] > 0 and len(r["ttfts"]) == 4
        assert 1 <= r["peak_running_requests"] <= 4
        assert 0 < r["peak_kv_usage"] <= 1
    none, lava = data["results"]["none"], data["results"]["lava:64"]
    assert none["compression_share_of_prefill"] is None
    assert 0 < lava["compression_share_of_prefill"] < 1
    comp = lava["compression_vs_prefill"][str(data["args"]["compression_lengths"][0])]
    assert comp["compression_ms"] > 0 and comp["prefill_ms"] > comp["compression_ms"]
    # compression frees KV: the compressed configuration's peak pool usage is lower
    assert lava["peak_kv_usage"] < none["peak_kv_usage"]
    ratios = data["ratios_to_none"]["lava:64"]
    assert set(ratios) >= {"peak_running_requests", "output_throughput", "decode_step_time"}
    md = (tmp_path / "serving.md").read_text()
    assert "Ratios to `none`" in md and "| lava:64 |" in md
    assert (tmp_path / "serving.png").stat().st_size > 10_000
