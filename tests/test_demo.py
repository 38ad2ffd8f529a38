"""The README's main job (``python -m lava_sglang.demo``) against the real CPU server, sized down.

No accuracy threshold (the default model is tiny): the report must have every row, the slots
held must fall with the budget, compression must let more of the burst run at once, and the prompt
longer than the pool must be refused but under compression during chunked prefill.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.server

BUDGETS = (256, 128, 64)


def test_demo_prints_every_row_and_slots_fall_with_the_budget(tmp_path):
    cmd = [sys.executable, "-m", "lava_sglang.demo", "--budgets", *map(str, BUDGETS), "--tokens", "1000",
           "--burst", "4", "--burst-tokens", "600", "--pool-requests", "2", "--long-tokens", "4000", "--chunk", "512",
           "--decode-tokens", "200", "--decode-budget", "96", "--decode-interval", "48",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500)
    out = proc.stdout
    print(out[-6000:])
    assert proc.returncode == 0, out[-4000:]

    # Every row of both tables and the closing lines are printed.
    assert "One question, several budgets" in out and "Under load" in out
    for budget in BUDGETS:
        assert f"LAVa, budget {budget} " in out
    assert out.count("full cache ") >= 2  # a passkey row and a burst row
    assert "LAVa, budget 128 " in out  # the burst under the server's policy (--kv-budget 128)
    assert f"Plot: {tmp_path / 'demo.png'}" in out or "Plot skipped:" in out  # tmp_path is outside the cwd: printed whole
    assert out.rstrip().splitlines()[-1].startswith("Full benchmarks and plots: benchmarks/results/")

    data = json.loads((tmp_path / "demo.json").read_text())
    rows = {r["budget"]: r for r in data["rows"]}
    assert set(rows) == {None, *BUDGETS}
    full = rows[None]
    assert not full["compressed"] and full["slots_held"] == full["prompt_tokens"] > 900
    for budget in BUDGETS:
        r = rows[budget]
        assert r["compressed"] and r["report"]["budget"] == budget, r
        assert r["cached_tokens"] == 0, r  # the tree was flushed: every row prefilled its own prompt
        assert r["prompt_tokens"] == full["prompt_tokens"]
        assert r["memory_saved"] == pytest.approx(r["prompt_tokens"] / r["slots_held"])
        assert 0 < r["compression_share"] < 1
    held = [rows[b]["slots_held"] for b in sorted(BUDGETS, reverse=True)]
    assert full["slots_held"] > held[0]
    assert all(a > b for a, b in zip(held, held[1:])), held

    # the prompt longer than the pool (~3x): refused with the full cache and after prefill (naming
    # kv_prefill_compression), answered chunk by chunk within budget + chunk + window + 1
    assert "A prompt longer than the pool" in out
    none_long, after_long, chunked_long = data["long"]
    assert none_long["status"] == after_long["status"] == 400, data["long"]
    assert "kv_prefill_compression" in after_long["refusal"] and "kv_prefill_compression" not in none_long["refusal"]
    assert chunked_long["status"] == 200 and chunked_long["prompt_tokens"] > 2.5 * data["pool_tokens"], chunked_long
    assert chunked_long["peak_slots"] <= chunked_long["bound"] == 256 + 512 + 32 + 1, chunked_long

    # the long output: a ramp after prefill, a sawtooth under the bound during decode
    assert "A long output" in out
    after_out, decode_out = data["decode"]
    assert after_out["tokens"] == decode_out["tokens"] == 200
    assert after_out["selections"] == 0 and after_out["trace"][-1][1] == after_out["trace"][0][1] + 200
    assert decode_out["selections"] >= 2 and decode_out["peak"] <= decode_out["bound"] == 128 + 48 + 1, decode_out
    assert decode_out["trace"][-1][1] < after_out["trace"][-1][1]

    none, lava = data["burst"]["full cache"], data["burst"]["LAVa, budget 128"]
    assert none["requests"] == lava["requests"] == 4
    assert none["compressed_requests"] == 0 and lava["compressed_requests"] == 4
    assert none["output_tokens"] == lava["output_tokens"] == 4 * 32
    assert 1 <= none["peak_running_requests"] <= 2  # the pool fits two full-cache requests
    assert lava["peak_running_requests"] > none["peak_running_requests"]
    assert lava["slots_per_request"] < none["slots_per_request"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "demo.png").stat().st_size > 10_000
