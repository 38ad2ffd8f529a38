"""The soak script (benchmarks/soak.py) for a short time: its own server, debug invariants on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent


def test_short_soak(tmp_path):
    seconds = os.environ.get("LAVA_SOAK_SECONDS", "35")
    cmd = [sys.executable, "-m", "benchmarks.soak", "--seconds", seconds, "--concurrency", "16", "--pool", "2048",
           "--long", "500", "--max-new", "24", "--beyond-pool-output", "0", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    results = sorted(tmp_path.glob("soak-*.json"))
    assert results, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(results[-1].read_text())
    summary = {k: result[k] for k in ("errors", "incomplete", "exact_mismatches", "leaked_slots", "tree_protected_tokens",
                                      "log_errors", "error_samples", "incomplete_samples", "stalled_requests",
                                      "stall_samples")}
    assert proc.returncode == 0 and result["ok"], summary
    assert result["requests_completed"] > 0 and result["final_memory"]["debug_checks"]["after_release"] > 0
    assert result["sessions"] > 0 and result["session_turns"] > 0, summary
    assert result["resend_conversations"] > 0 and result["resend_turns"] > 0, summary
    assert result["requests_chunked"] > 0, result["counts"]  # compressed during chunked prefill
    assert result["requests_decode"] > 0, result["counts"]  # drew a decode budget
    assert result["stalled_requests"] == 0 and result["max_waited_s"] <= result["max_wait_bound_s"], summary
