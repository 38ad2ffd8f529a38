"""The examples under examples/ run against the real CPU server, plus metrics and --dp-size.

Prompts are sized down from the examples' defaults (the CPU server on a 2-core machine is slow)
but every private part stays longer than the budget, so compression really happens. They run
on the ``lava-chunked`` server of ``tests/conftest.py`` (budget 128, streaming sessions, metrics,
debug invariants), the one the session tests use.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.server_configs("lava-chunked")]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frontend_fork_shares_document_and_compresses_branches(servers, capsys):
    server = servers.config("lava-chunked")
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
        assert report["private_tokens"] == row["prompt_tokens"] - report["shared_prefix_tokens"]
        assert report["slots_freed"] > 0
        assert report["slots_held"] - report["shared_prefix_tokens"] < report["private_tokens"]


def test_multi_turn_agent_reuses_history_in_both_client_styles_and_holds_less(servers, capsys):
    server = servers.config("lava-chunked")
    out = load_example("multi_turn_agent").main(["--url", server.url, "--sessions", "2", "--turns", "2",
                                                 "--system-tokens", "0", "--result-tokens", "160", "--max-tokens", "6"])
    print(capsys.readouterr().out)
    shared = out["shared_len"]
    results = out["results"]
    assert set(results) == {"none, resend", "lava, resend", "lava, session"}
    for label, sessions in results.items():
        assert len(sessions) == 2
        for rows in sessions:
            assert [r["turn"] for r in rows] == [1, 2]
            assert all(r["cached_tokens"] >= shared - 2 for r in rows), rows  # the system prompt every turn
            assert all(r["compressed"] is label.startswith("lava") for r in rows), rows
            # turn 2 is served from memory: the tree (none), the parked conversation (resend) or
            # the session (session): it prefills about the new message only
            assert rows[1]["cached_tokens"] >= rows[0]["prompt_tokens"], (label, rows)
            if label.startswith("lava"):
                assert rows[1]["continued"], (label, rows)
    held = {label: sum(rows[-1]["held_slots"] for rows in sessions) for label, sessions in results.items()}
    assert held["lava, resend"] < held["none, resend"] and held["lava, session"] < held["none, resend"], held


def test_frontend_multi_turn_program_continues_the_parked_conversation(servers, capsys):
    server = servers.config("lava-chunked")
    out = load_example("frontend_multi_turn").main(["--url", server.url, "--turns", "3", "--doc-tokens", "600"])
    print(capsys.readouterr().out)
    rows = out["rows"]
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert rows[0]["report"] and not rows[0]["report"].get("continued")
    for prev, row in zip(rows, rows[1:]):
        # the frontend resent the whole text; everything before the new question was held
        assert row["report"] and row["report"]["continued"], row
        assert row["cached_tokens"] >= prev["prompt_tokens"], (prev, row)
        assert row["prompt_tokens"] - row["cached_tokens"] < 64, row


def test_openai_client_per_request_budget(servers, capsys):
    server = servers.config("lava-chunked")
    out = load_example("openai_long_context").main(["--url", server.url, "--tokens", "600", "--budget", "64"])
    print(capsys.readouterr().out)
    default, small, none = out["server default"], out["kv_budget=64"], out["kv_policy=none"]
    assert default["compressed"] == 1 and small["compressed"] == 1 and none["compressed"] == 0
    assert small["freed_slots"] > default["freed_slots"] > 0
    assert none["freed_slots"] == 0
    assert default["prompt_tokens"] == small["prompt_tokens"] == none["prompt_tokens"] > 500


def prometheus_totals(url: str) -> tuple[dict, str]:
    """``sglang:lava_*`` series summed over their labels (buckets left out), and the whole text."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
        text = r.read().decode()
    values: dict = {}
    for line in text.splitlines():
        if line.startswith("sglang:lava_") and "_bucket" not in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    return values, text


def test_metrics_count_the_same_events_as_server_info(servers):
    """/metrics and /server_info count each selection once, where it happens: a prompt compressed
    chunk by chunk (chunk 256) adds its chunks' selections to ``selections`` at once."""
    server = servers.config("lava-chunked")  # --enable-metrics
    from lava_sglang.workloads import passkey_task

    server.wait_settled()
    before = server.kv_memory()
    out = server.generate(passkey_task(900, seed=41).prompt, max_new_tokens=2,
                          sampling_params={"custom_params": {"kv_prefill_compression": "chunked"}})
    report = out["meta_info"]["kv_compression"][0]
    assert report["chunk_selections"] >= 3 and report["private_slots"] == report["slots_held"] - report["shared_prefix_tokens"]
    after = server.wait_settled()
    assert after["selections"] - before["selections"] == report["chunk_selections"]
    assert after["compressed_requests"] - before["compressed_requests"] == 1
    assert after["freed_slots"] - before["freed_slots"] == report["slots_freed_total"]
    values, text = prometheus_totals(server.url)
    for series, total in (("compressed_requests_total", "compressed_requests"), ("selections_total", "selections"),
                          ("reselections_total", "reselections"), ("kept_cells_total", "kept_cells"),
                          ("freed_slots_total", "freed_slots"), ("compression_seconds_count", "selections")):
        assert values.get(f"sglang:lava_{series}", 0) == after[total], (series, values, after)
    assert values["sglang:lava_kept_ratio_count"] == after["compressed_requests"]
    assert 0 < values["sglang:lava_kept_ratio_sum"] <= values["sglang:lava_kept_ratio_count"]
    assert abs(values["sglang:lava_compression_seconds_sum"] - after["compression_seconds"]) < 0.01 * max(1, after["selections"])
    assert "sglang:num_running_reqs" in text  # next to SGLang's own metrics


@pytest.mark.server_configs("lava-dp2")
def test_dp_size_2_each_rank_compresses(servers):
    # On CPU, SGLang binds each rank to a NUMA node and refuses more ranks than nodes unless
    # SGLANG_CPU_OMP_THREADS_BIND gives each rank its cores ("0|1": rank 0 on core 0, rank 1 on core 1).
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores for 2 CPU ranks")
    server = servers.config("lava-dp2", env={"SGLANG_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"})
    from lava_sglang.workloads import passkey_task

    results = {}

    def run(i):  # compressed during chunked prefill (256-token chunks): selected twice on its rank; then during decode
        results[i] = server.generate(passkey_task(400, seed=70 + i).prompt, max_new_tokens=100, sampling_params={
            "ignore_eos": True, "custom_params": {"kv_prefill_compression": "chunked", "kv_decode_budget": 64,
                                                  "kv_decode_interval": 32}})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    ranks = set()
    for out in results.values():
        report = out["meta_info"]["kv_compression"][0]
        assert report["policy"] == "lava" and report["slots_freed_total"] > 0
        assert report["prefill_compression"] == "chunked" and report["chunk_selections"] == 2, report
        assert report["peak_slots"] <= 128 + 256 + 32 + 1, report
        assert report["decode_selections"] >= 2 and report["decode_peak_slots"] <= 128 + 32 + 1, report
        ranks.add(out["meta_info"]["dp_rank"])
    assert ranks == {0, 1}  # round robin: one request per rank
    states = server.server_info()["internal_states"]
    assert len(states) == 2
    assert [s["kv_compression"]["compressed_requests"] for s in states] == [1, 1]
