"""The examples under examples/ run against the real CPU server, plus metrics and --dp-size.

Prompts are sized down from the examples' defaults (the CPU server on a 2-core machine is slow)
but every private part stays longer than the budget, so compression really happens.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

LAVA = ("--kv-policy", "lava", "--kv-budget", "128")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frontend_fork_shares_document_and_compresses_branches(servers, capsys):
    server = servers.get(*LAVA)
    out = load_example("frontend_fork").main(["--url", server.url, "--branches", "2", "--doc-tokens", "300",
                                              "--appendix-tokens", "180"])
    print(capsys.readouterr().out)
    rows = out["rows"]
    assert len(rows) == 2
    for row in rows:
        report = row["report"]
        assert report is not None, row
        # The document was primed by fork() and reused: it is the shared, uncompressed prefix.
        assert row["cached_tokens"] >= 250, row
        assert report["shared_prefix_tokens"] >= 250
        assert report["compressed_tokens"] == row["prompt_tokens"] - report["shared_prefix_tokens"]
        assert report["slots_freed"] > 0
        assert report["slots_held"] - report["shared_prefix_tokens"] < report["compressed_tokens"]


def test_multi_turn_agent_reuses_system_prompt_and_holds_less(servers, capsys):
    server = servers.get(*LAVA)
    out = load_example("multi_turn_agent").main(["--url", server.url, "--sessions", "2", "--turns", "2",
                                                 "--system-tokens", "0", "--result-tokens", "160", "--max-tokens", "6"])
    print(capsys.readouterr().out)
    shared = out["shared_len"]
    none, lava = out["results"]["none"], out["results"]["server policy"]
    for sessions, compressed in ((none, False), (lava, True)):
        assert len(sessions) == 2
        for rows in sessions:
            assert [r["turn"] for r in rows] == [1, 2]
            for r in rows:
                assert r["cached_tokens"] >= shared - 2, r  # the shared system prompt is reused every turn
                assert r["compressed"] is compressed, r
    # Without compression turn 2 finds the session's own turn 1 in the tree; with it only the system prompt.
    assert all(rows[1]["cached_tokens"] > rows[0]["prompt_tokens"] - 5 for rows in none)
    assert all(rows[1]["cached_tokens"] < rows[0]["prompt_tokens"] for rows in lava)
    held_none = sum(rows[-1]["held_slots"] for rows in none)
    held_lava = sum(rows[-1]["held_slots"] for rows in lava)
    assert held_lava < held_none


def test_openai_client_per_request_budget(servers, capsys):
    server = servers.get(*LAVA)
    out = load_example("openai_long_context").main(["--url", server.url, "--tokens", "600", "--budget", "64"])
    print(capsys.readouterr().out)
    default, small, none = out["server default"], out["kv_budget=64"], out["kv_policy=none"]
    assert default["compressed"] == 1 and small["compressed"] == 1 and none["compressed"] == 0
    assert small["freed_slots"] > default["freed_slots"] > 0
    assert none["freed_slots"] == 0
    assert default["prompt_tokens"] == small["prompt_tokens"] == none["prompt_tokens"] > 500


def test_metrics_on_prometheus_endpoint(servers):
    server = servers.get(*LAVA, "--enable-metrics")
    from lava_sglang.workloads import passkey_task

    out = server.generate(passkey_task(400, seed=41).prompt, max_new_tokens=2)
    report = out["meta_info"]["kv_compression"][0]
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("sglang:lava_") and 'policy="lava"' in line and "_bucket" not in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    assert values["sglang:lava_compressed_requests_total"] >= 1, values
    assert values["sglang:lava_kept_cells_total"] >= report["kept_cells"]
    assert values["sglang:lava_freed_slots_total"] >= report["slots_freed"] > 0
    assert values["sglang:lava_compression_ratio_count"] >= 1
    assert 0 < values["sglang:lava_compression_ratio_sum"] <= values["sglang:lava_compression_ratio_count"]
    assert values["sglang:lava_compression_seconds_count"] >= 1
    assert "sglang:num_running_reqs" in text  # next to SGLang's own metrics


def test_dp_size_2_each_rank_compresses(servers, monkeypatch):
    # On CPU, SGLang binds each rank to a NUMA node and refuses more ranks than nodes unless
    # SGLANG_CPU_OMP_THREADS_BIND gives each rank its cores ("0|1": rank 0 on core 0, rank 1 on core 1).
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores for 2 CPU ranks")
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", f"{cores[0]}|{cores[1]}")
    server = servers.get(*LAVA, "--dp-size", "2")
    from lava_sglang.workloads import passkey_task

    results = {}

    def run(i):
        results[i] = server.generate(passkey_task(400, seed=70 + i).prompt, max_new_tokens=4)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    ranks = set()
    for out in results.values():
        report = out["meta_info"]["kv_compression"][0]
        assert report["policy"] == "lava" and report["slots_freed"] > 0
        ranks.add(out["meta_info"]["dp_rank"])
    assert ranks == {0, 1}  # round robin: one request per rank
    states = server.server_info()["internal_states"]
    assert len(states) == 2
    assert [s["kv_compression"]["compressed_requests"] for s in states] == [1, 1]
