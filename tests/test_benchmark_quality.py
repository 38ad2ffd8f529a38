"""The quality benchmark: task generators (fast) and a ``--quick`` run end to end (real servers).

The quick run checks that the outputs exist and are well-formed; it sets no accuracy threshold.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality_bench.metrics import fidelity, topk_kl  # noqa: E402
from benchmarks.tasks import TASKS, make_samples, score  # noqa: E402


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_deterministic_and_sized(task, tokenizer):
    a = make_samples(task, 600, 2, None, tokenizer)
    b = make_samples(task, 600, 2, None, tokenizer)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert a[0].prompt != a[1].prompt
    for s in a:
        n = len(tokenizer.encode(s.prompt))
        assert 450 <= n <= 620, (task, n)
        for ans in s.answers:  # every answer is in the context it must be found in
            assert ans in s.context
        if task != "fidelity":
            assert score(s, " ".join(s.answers)) == 1.0
            assert score(s, "nothing") == 0.0


def test_score_rules():
    s = make_samples("niah_multivalue", 300, 1, None, None)[0]
    assert score(s, s.answers[0] + " and " + s.answers[1]) == 0.5
    p = make_samples("passkey", 300, 1, None, None)[0]
    assert score(p, p.answers[0][:3]) == 0.0  # a prefix of the key is wrong
    assert score(p, "1" + p.answers[0]) == 0.0


def test_fidelity_metrics():
    top = [[-0.1, 5], [-2.5, 7]]
    assert topk_kl(top, top) == pytest.approx(0.0, abs=1e-9)
    assert topk_kl(top, [[-0.1, 7], [-2.5, 5]]) > 0.5
    f = fidelity([1, 2, 3, 4], [top] * 4, [1, 2, 9, 4], [top] * 4)
    assert f["token_match"] == 0.75 and f["first_divergence"] == 2 and f["kl_steps"] == 3


def test_quality_per_memory(tmp_path, monkeypatch):
    """The per-memory table: a row per (policy, budget), slots recorded and under exact packing
    (prefix + ceil(kept_cells / (layers x heads)), from the report, else the model's layers x heads)."""
    from benchmarks.quality_bench import metrics, plots, report

    monkeypatch.setattr(metrics, "model_cells_per_slot", lambda: 90)
    summary = {"300": {"passkey": {"n": 3, "accuracy": 50.0}, "fidelity": {"n": 3, "token_match": 40.0, "kl": 0.1},
                       "mean": {"accuracy": 50.0}}}
    rec = lambda report, **kw: {"task": "passkey", "seed": 0, "n_tokens": 300, "prompt_tokens": 300,  # noqa: E731
                                "kv_compression": report, **kw}
    result = {"config": {"policies": ["none", "lava"], "budgets": [64, 128], "lengths": [300], "samples": 3,
                         "tasks": ["passkey", "fidelity"], "model": "m"},
              "runs": {"none": {"summary": summary, "records": [rec(None)]},
                       "lava@64": {"summary": summary, "records": [
                           rec({"kept_cells": 64 * 90 + 1, "private_cells": 290 * 90, "private_tokens": 290,
                                "shared_prefix_tokens": 10, "slots_held": 80}),  # 10 + 65
                           rec({"kept_cells": 64 * 90, "private_cells": 300 * 90, "private_tokens": 300,
                                "shared_prefix_tokens": 0, "slots_held": 70}),  # 64
                           rec({"kept_cells": 180, "slots_held": 5})]},  # 0 + 2, layers x heads of the model
                       "lava@128": {"summary": summary, "records": [rec({"slots_held": 140})]}}}  # no kept_cells
    assert [metrics.exact_slots_held(r) for r in result["runs"]["lava@64"]["records"]] == [75, 64, 2]
    lines = report._memory_lines(result, 300)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| policy")]
    assert rows == ["| none (full cache) | - | 50 | 40 | 0.100 | 300.0 | 300.0 |",
                    "| lava | 64 | 50 | 40 | 0.100 | 51.7 | 47.0 |",
                    "| lava | 128 | 50 | 40 | 0.100 | 140.0 | - |"]
    assert lines[0] == "## Quality per KV memory, 300-token prompts"
    assert any("keep no `kept_cells`" in line for line in lines)
    assert plots.write_memory_plot(result, tmp_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _FakeServer:
    """Stands in for lava_sglang.launch.Server: canned greedy outputs, no process. Streaming
    sessions (``session_params``) keep their token count, like SGLang's."""

    started: list = []
    sessions: dict = {}  # open session id -> tokens so far
    closed: list = []
    calls: list = []  # (session id or None, number of input ids, sampling_params) of session turns

    def __init__(self, model_path, flags, **kwargs):
        self.flags = list(flags)
        self.url = "http://fake"

    def start(self):
        _FakeServer.started.append(self.flags)
        return self

    def stop(self):
        pass

    def open_session(self, capacity):
        sid = f"s{len(_FakeServer.sessions) + len(_FakeServer.closed)}"
        _FakeServer.sessions[sid] = 0
        return sid

    def close_session(self, sid):
        del _FakeServer.sessions[sid]
        _FakeServer.closed.append(sid)

    def generate(self, text=None, max_new_tokens=16, input_ids=None, **kwargs):
        custom = kwargs.get("sampling_params", {}).get("custom_params", {})
        session = kwargs.get("session_params")
        if session is not None:  # a streaming session's turn: the context turn is the one compressed
            sid = session["id"]
            assert sid in _FakeServer.sessions and input_ids and text is None
            cached = _FakeServer.sessions[sid]
            _FakeServer.sessions[sid] += len(input_ids)
            _FakeServer.calls.append((sid, len(input_ids), dict(kwargs.get("sampling_params", {}), max_new_tokens=max_new_tokens)))
            compressed = custom.get("kv_policy", "lava" if "lava" in self.flags else "none") != "none"
            report = ({"policy": custom.get("kv_policy", "lava"), "slots_held": 64, "turn": 1} if compressed and not cached
                      else {"policy": "lava", "slots_held": 64, "turn": 2, "continued": True, "reselected": compressed}
                      if cached and "lava" in self.flags else None)
            meta = {"prompt_tokens": cached + len(input_ids), "cached_tokens": cached,
                    "kv_compression": [report] if report else None}
            ids = [(7 * i + (5 if report and i > 2 else 0)) % 50 for i in range(max_new_tokens)]
            if kwargs.get("return_logprob"):
                meta["output_top_logprobs"] = [[[-0.1, t, None], [-2.5, t + 1, None]] for t in ids]
            return {"text": " " + " ".join(map(str, ids)), "output_ids": ids, "meta_info": meta}
        compressed = custom.get("kv_policy", "none") != "none" or "lava" in self.flags
        ids = [(7 * i + (3 if compressed and i > 4 else 0)) % 50 for i in range(max_new_tokens)]
        meta = {"prompt_tokens": 123, "kv_compression": [{"policy": custom.get("kv_policy", "lava")}] if compressed else None}
        if kwargs.get("return_logprob"):
            meta["output_top_logprobs"] = [[[-0.1, t, None], [-2.5, t + 1, None]] for t in ids]
        answer = text.split("pass key is ")[1][:5] if "pass key is " in text else "?"
        return {"text": f" {answer} " + " ".join(map(str, ids)), "output_ids": ids, "meta_info": meta}


def _fake_hf(monkeypatch):
    import benchmarks.kvpress_reference as kr
    from benchmarks.quality_bench import client, runner

    _FakeServer.started, _FakeServer.sessions, _FakeServer.closed, _FakeServer.calls = [], {}, [], []
    monkeypatch.setattr(runner, "Server", _FakeServer)
    monkeypatch.setattr(kr, "load_hf", lambda *a, **k: (None, None))
    monkeypatch.setattr(runner, "run_hf_reference", lambda model, tok, samples, modes, protocol, log=print: {
        key: client.run_server_samples(_FakeServer(None, [] if mode == "none" else ["lava"]), samples, key, log)
        for key, (mode, budget, window) in modes.items()})


@pytest.mark.parametrize("per_request", [False, True])
def test_pipeline_without_servers(tmp_path, monkeypatch, per_request):
    """JSON, markdown and plots from canned server/HF outputs, in seconds (both run modes)."""
    import benchmarks.quality as q

    _fake_hf(monkeypatch)
    argv = ["--policies", "none", "snapkv", "lava", "--budgets", "64", "128", "--lengths", "300", "--samples", "2",
            "--tasks", "passkey", "vt", "fidelity", "--kvpress", "snapkv", "--kvpress-budgets", "64", "--out", str(tmp_path)]
    assert q.main(argv + (["--per-request"] if per_request else [])) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["complete"] and result["config"]["per_request"] == per_request
    assert len(_FakeServer.started) == (2 if per_request else 1 + 2 * 2 + 1)
    assert set(result["runs"]) == {"none", "snapkv@64", "snapkv@128", "lava@64", "lava@128", "hf-none",
                                   "snapkv-avg@64", "kvpress-snapkv@64"}
    s = result["runs"]["lava@128"]["summary"]["300"]
    assert s["passkey"]["accuracy"] == 100 and s["fidelity"]["token_match"] < 100 and s["fidelity"]["kl"] > 0
    assert result["runs"]["none"]["summary"]["300"]["fidelity"]["token_match"] == 100
    if per_request:
        assert result["runs"]["snapkv-avg@64"]["custom_params"] == {"kv_policy": "snapkv", "kv_budget": 64, "kv_pooling": "avg"}
    md = (tmp_path / "quality.md").read_text()
    assert "| passkey | lava | 100 | 100 |" in md and "| 300 | 64 | kvpress snapkv |" in md
    for png in ("quality.png", "quality_tasks.png", "quality_memory.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Quality per KV memory, 300-token prompts" in md
    assert q.main(["--replot", "--out", str(tmp_path)]) == 0


def test_parallel_parts_merge_and_reference_subset(tmp_path, monkeypatch):
    """Budgets run by two processes, then merged; the reference check on the first sample of each task."""
    import benchmarks.quality as q

    _fake_hf(monkeypatch)
    common = ["--per-request", "--lengths", "300", "--samples", "2", "--tasks", "passkey", "fidelity"]
    assert q.main(common + ["--budgets", "64", "--no-kvpress", "--out", str(tmp_path / "a")]) == 0
    assert q.main(common + ["--policies", "lava", "--budgets", "128", "--no-kvpress", "--out", str(tmp_path / "b")]) == 0
    started = len(_FakeServer.started)
    assert q.main(common + ["--budgets", "64", "128", "--kvpress", "snapkv", "--kvpress-budgets", "32", "128",
                            "--kvpress-samples", "1", "--merge", str(tmp_path / "a"), str(tmp_path / "b"),
                            "--out", str(tmp_path / "m")]) == 0
    assert len(_FakeServer.started) == started + 1  # only the reference check's server ran
    result = json.loads((tmp_path / "m" / "quality.json").read_text())
    # kvpress gets the server's window: half of it at budgets that do not exceed it
    assert result["runs"]["kvpress-snapkv@32"]["window"] == 16 and result["runs"]["kvpress-snapkv@128"]["window"] == 32
    assert result["runs"]["snapkv-avg@32"]["custom_params"]["kv_window"] == 16
    assert result["complete"] and [m["dir"] for m in result["config"]["merged_from"]] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert {"none", "lava@64", "lava@128", "hf-none", "kvpress-snapkv@128", "snapkv-avg@128"} <= set(result["runs"])
    assert len(result["runs"]["lava@128"]["records"]) == 4
    for key in ("hf-none", "kvpress-snapkv@128", "snapkv-avg@128"):
        assert sorted((r["task"], r["seed"]) for r in result["runs"][key]["records"]) == [("fidelity", 0), ("passkey", 0)]
    # fidelity of the part run without `none` is computed against the merged `none`
    assert result["runs"]["lava@128"]["summary"]["300"]["fidelity"]["token_match"] < 100
    server_none = next(r for r in result["reference"]["rows"] if r["label"] == "server none")
    assert server_none["summary"]["passkey"]["n"] == 1
    assert " ; merged and completed with: " in result["command"]
    with pytest.raises(SystemExit):  # other samples cannot be merged
        q.main(["--samples", "3", "--lengths", "300", "--tasks", "passkey", "--merge", str(tmp_path / "a"),
                "--out", str(tmp_path / "x")])


def test_query_agnostic_protocol_and_old_results(tmp_path, monkeypatch):
    """--protocol both: one session per sample (context turn with max_new_tokens 0, then the question
    over the cached context), every session closed; a query-aware result without protocol fields
    (as written before the protocol existed) merges: only the query-agnostic runs are run."""
    import gzip

    import benchmarks.quality as q
    from benchmarks.quality_bench.report import FULL_RESULT

    _fake_hf(monkeypatch)
    common = ["--per-request", "--policies", "none", "lava", "--budgets", "64", "--lengths", "300", "--samples", "2",
              "--tasks", "passkey", "fidelity", "--no-kvpress"]
    assert q.main(common + ["--out", str(tmp_path / "old")]) == 0
    full = tmp_path / "old" / FULL_RESULT
    old = json.loads(gzip.decompress(full.read_bytes()))
    for field in ("protocols", "agnostic_question"):  # an older file
        old["config"].pop(field)
    assert not any("protocol" in run for run in old["runs"].values())
    full.write_bytes(gzip.compress(json.dumps(old).encode()))
    assert not any("--enable-streaming-session" in flags for flags in _FakeServer.started)

    _FakeServer.started = []
    assert q.main(common + ["--protocol", "both", "--merge", str(tmp_path / "old"), "--out", str(tmp_path / "m")]) == 0
    assert len(_FakeServer.started) == 2 and all("--enable-streaming-session" in f for f in _FakeServer.started)
    result = json.loads((tmp_path / "m" / "quality.json").read_text())
    assert result["config"]["protocols"] == ["query-aware", "query-agnostic"]
    assert set(result["runs"]) == {"none", "lava@64", "none query-agnostic", "lava@64 query-agnostic"}
    assert result["runs"]["lava@64"]["records"] == [{k: v for k, v in r.items() if k != "top_logprobs"}
                                                    for r in old["runs"]["lava@64"]["records"]]
    agn = result["runs"]["lava@64 query-agnostic"]
    assert agn["protocol"] == "query-agnostic" and agn["question_custom_params"] == {"kv_policy": "none"}
    assert not _FakeServer.sessions and len(_FakeServer.closed) == 8  # 4 samples x (none, lava)
    for r in agn["records"]:
        assert r["cached_tokens"] == r["context_tokens"] and r["context_tokens"] + r["question_turn_prompt_tokens"] > 0
        assert r["slots_held"] == 64 and r["kv_compression"]["turn"] == 1 and r["kv_compression_question"]["continued"]
        assert r["question_is_last_context_token"] == (r["task"] == "fidelity")
        if r["task"] == "fidelity":
            assert r["prompt_tokens"] - r["context_tokens"] == 1 and r["token_match"] < 1
    turns = [c for c in _FakeServer.calls if c[2].get("custom_params", {}).get("kv_policy") == "lava"]
    assert [c[2]["max_new_tokens"] for c in turns] == [0] * 4  # every context turn, nothing generated
    s = agn["summary"]["300"]
    assert s["mean"]["slots_held"] == 64 and s["fidelity"]["token_match"] < 100
    assert result["runs"]["none query-agnostic"]["summary"]["300"]["fidelity"]["token_match"] == 100
    md = (tmp_path / "m" / "quality.md").read_text()
    assert "## Protocols side by side, 300-token prompts" in md and "| lava | query-agnostic | " in md
    assert "| none (full cache) | query-aware | " in md and "## Summary, 300-token prompts, query-agnostic" in md
    assert "`cached_tokens` = the context's length in 8;" in md
    assert q.main(["--replot", "--out", str(tmp_path / "m")]) == 0
    assert q.main(["--replot", "--out", str(tmp_path / "old")]) == 0  # the old file still renders
    assert "query-agnostic" not in (tmp_path / "old" / "quality.md").read_text()


@pytest.mark.server
def test_quick_run_writes_results(tmp_path, model_path):
    from benchmarks.quality import main

    assert main(["--quick", "--out", str(tmp_path), "--model-path", model_path]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    cfg = result["config"]
    assert cfg["policies"] == ["none", "lava"] and cfg["budgets"] == [64] and cfg["samples"] == 1
    assert {"passkey", "fidelity"} <= set(cfg["tasks"])  # a scored task and the fidelity task
    assert cfg["protocols"] == ["query-aware", "query-agnostic", "chunked"]
    assert result["command"].startswith("python benchmarks/quality.py")
    for key in ("none", "lava@64", "none query-agnostic", "lava@64 query-agnostic", "lava@64 chunked", "snapkv-avg@64",
                "kvpress-snapkv@64", "hf-none"):
        run = result["runs"][key]
        summary = run["summary"][str(cfg["lengths"][0])]
        for task in cfg["tasks"]:
            v = summary[task]
            assert v["n"] == 1
            if task == "fidelity":
                assert 0 <= v["token_match"] <= 100 and v["kl"] >= 0 and not math.isnan(v["kl"])
            else:
                assert 0 <= v["accuracy"] <= 100
    # the compressing server really compressed (its report came back in meta_info)
    lava = result["runs"]["lava@64"]["records"]
    assert all(r["kv_compression"] and r["kv_compression"]["policy"] == "lava" for r in lava)
    # query-agnostic: the context turn was compressed, the question turn continued over it and
    # prefilled only the question (everything before it was cached)
    for r in result["runs"]["lava@64 query-agnostic"]["records"]:
        assert r["kv_compression"]["policy"] == "lava" and r["kv_compression"]["prompt_tokens"] == r["context_tokens"]
        assert r["slots_held"] == r["kv_compression"]["slots_held"] < r["context_tokens"]
        assert r["cached_tokens"] == r["context_tokens"] and r["question_turn_prompt_tokens"] == r["prompt_tokens"]
        assert r["kv_compression_question"]["continued"] and not r["kv_compression_question"]["reselected"]
    # --prefill-compression chunked (both, under --quick): 300-token prompts in 256-token chunks,
    # selected after the first chunk and again at the end
    for r in result["runs"]["lava@64 chunked"]["records"]:
        rep = r["kv_compression"]
        selections = 2 if rep["prompt_tokens"] - 32 >= 256 else 1  # the first chunk holds none of the last window
        assert rep["prefill_compression"] == "chunked" and rep["chunk_selections"] == selections, rep
        assert rep["peak_slots"] <= 64 + 256 + 32 + 1, rep
    assert "none chunked" not in result["runs"]
    for r in result["runs"]["none query-agnostic"]["records"]:
        assert r["kv_compression"] is None and r["cached_tokens"] == r["context_tokens"]
    assert result["reference"]["rows"]
    md = (tmp_path / "quality.md").read_text()
    assert "| passkey | lava |" in md and "query-aware" in md and "kvpress" in md
    assert "| lava | query-agnostic |" in md and "| lava | chunked |" in md
    for png in ("quality.png", "quality_tasks.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # --decode-compression (on under --quick): none, lava@64 after, lava@64 N=64 (D=32) on the shared server
    decode = json.loads((tmp_path / "decode.json").read_text())
    dc = decode["config"]
    assert decode["complete"] and dc["decode_budgets"] == [64] and dc["interval"] == 32 and dc["samples"] == 2
    assert list(decode["runs"]) == ["none", "lava@64", "lava@64 N=64"]
    assert len(decode["runs"]["none"]["records"]) == 2 * len(dc["tasks"]) and decode["sanity"]["fidelity"]["passed"]
    for key, run in decode["runs"].items():
        assert run["records"] and all(r["output_tokens"] > 0 and 0 <= r["distinct4"] <= 1 for r in run["records"])
        for r in run["records"]:
            rep = r["kv_compression"]
            if key == "none":
                assert rep is None
            elif r["task"] != "loops":  # (a chat prompt shorter than the budget is not compressed)
                # the radix cache was flushed after `none`: the whole prompt was compressed
                assert rep and not rep["shared_prefix_tokens"] and rep["private_slots"] <= 64, rep
            if key == "lava@64 N=64" and r["task"] == "fidelity":  # 200-token prompt, 40 tokens out: selected at 32
                assert rep["decode_selections"] >= 1 and rep["decode_peak_slots"] <= 64 + 32 + 1, rep
    fid = decode["summary"]["lava@64 N=64"]["fidelity"]
    assert fid["token_match"]["n"] == 2 and 0 <= fid["token_match"]["mean"] <= 1 and fid["token_match_vs_after"]["n"] == 2
    assert "## The full cache on each task" in (tmp_path / "decode.md").read_text()


def test_decode_scores():
    from benchmarks.quality_bench.decode import plan, spread
    from benchmarks.quality_bench.decode_tasks import copy_score, distinct_ngrams, lcs_length

    assert lcs_length([1, 2, 3, 4], [1, 9, 3, 4, 2]) == 3
    assert copy_score([1, 2, 3, 4], [1, 2, 3, 4, 5]) == 1.0 and copy_score([1, 2, 3, 4], [4, 3]) == 0.25
    assert distinct_ngrams([1, 2, 3, 4, 5]) == 1.0 and distinct_ngrams([1, 2] * 10) == 2 / 17
    s = spread([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0 and s["ci95"] == pytest.approx(4.303 / 3 ** 0.5)
    keys = [k for k, _ in plan(["none", "lava"], 512, [128, 256], 128)]
    assert keys == ["none", "lava@512", "lava@512 N=128", "lava@512 N=256"]
    assert dict(plan(["lava"], 512, [128], 64))["lava@512 N=128"] == {
        "kv_policy": "lava", "kv_budget": 512, "kv_decode_budget": 128, "kv_decode_interval": 64}


def test_decode_study_without_servers(tmp_path, monkeypatch, tokenizer):
    """--decode-compression only: one per-request server, the radix cache flushed before every
    configuration, decode.json / decode.md written, --resume runs only what is missing."""
    import benchmarks.quality as q
    from benchmarks.quality_bench import decode_tasks

    _fake_hf(monkeypatch)
    flushed = []
    monkeypatch.setattr(_FakeServer, "flush_cache", lambda self: flushed.append(1), raising=False)
    monkeypatch.setattr(decode_tasks, "make_loops", lambda seed, tok, n: decode_tasks.LongSample("loops", seed, f"essay {seed}", n, True))
    argv = ["--decode-compression", "only", "--policies", "none", "snapkv", "lava", "--decode-budgets", "64",
            "--decode-interval", "32", "--decode-prompt-budget", "64", "--decode-samples", "2", "--decode-output-tokens",
            "40", "--decode-prompt-tokens", "200", "--copy-tokens", "48", "--out", str(tmp_path)]
    assert q.main(argv) == 0
    assert len(_FakeServer.started) == 1 and len(flushed) == 5
    result = json.loads((tmp_path / "decode.json").read_text())
    assert result["complete"] and not (tmp_path / "quality.json").exists()
    assert list(result["runs"]) == ["none", "snapkv@64", "snapkv@64 N=64", "lava@64", "lava@64 N=64"]
    assert result["runs"]["lava@64 N=64"]["custom_params"] == {"kv_policy": "lava", "kv_budget": 64,
                                                                "kv_decode_budget": 64, "kv_decode_interval": 32}
    none = result["summary"]["none"]
    assert none["fidelity"]["token_match"]["mean"] == 1.0 and none["loops"]["distinct4"]["n"] == 2
    assert 0 <= none["copy"]["copy"]["mean"] <= 1
    lava = result["summary"]["lava@64 N=64"]["fidelity"]
    assert lava["token_match"]["n"] == lava["token_match_vs_after"]["n"] == lava["first_divergence"]["n"] == 2
    assert set(result["sanity"]) == {"copy", "fidelity", "loops"} and result["sanity"]["fidelity"]["passed"]
    # the fake copies nothing: copy fails the full-cache check and no compressed configuration runs it
    assert not result["sanity"]["copy"]["passed"] and result["sanity"]["loops"]["passed"]
    assert {r["task"] for r in result["runs"]["lava@64 N=64"]["records"]} == {"fidelity", "loops"}
    assert "lava@64 N=64 vs lava@64" in result["paired"] and "lava@64 vs snapkv@64" in result["paired"]
    md = (tmp_path / "decode.md").read_text()
    assert "## The full cache on each task" in md and "| none (full cache) |" in md
    assert q.main(argv + ["--resume"]) == 0 and len(flushed) == 5  # nothing left to run: no server started
    assert len(_FakeServer.started) == 1 and json.loads((tmp_path / "decode.json").read_text())["runs"] == result["runs"]
