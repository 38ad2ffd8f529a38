"""The serving benchmark's ``--quick`` run end to end (two real servers, same pool and workload).

It checks that every metric the issue asks for is measured and written (JSON, table, plot), and
that the engine-side numbers are consistent with the workload; it sets no performance threshold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.server

METRICS = ("request_throughput", "output_throughput", "decode_phase_throughput", "ttft_p50", "ttft_p99", "itl_p50",
           "itl_p99", "peak_running_requests", "peak_kv_usage", "retractions", "decode_step_s")


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
    comp = lava["compression_vs_prefill"]["600"]
    assert comp["compression_ms"] > 0 and comp["prefill_ms"] > comp["compression_ms"]
    # compression frees KV: the compressed configuration's peak pool usage is lower
    assert lava["peak_kv_usage"] < none["peak_kv_usage"]
    ratios = data["ratios_to_none"]["lava:64"]
    assert set(ratios) >= {"peak_running_requests", "output_throughput", "decode_step_time"}
    md = (tmp_path / "serving.md").read_text()
    assert "Ratios to `none`" in md and "| lava:64 |" in md
    assert (tmp_path / "serving.png").stat().st_size > 10_000
