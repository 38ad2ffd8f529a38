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

from benchmarks.quality import fidelity, topk_kl  # noqa: E402
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


@pytest.mark.server
def test_quick_run_writes_results(tmp_path, model_path):
    from benchmarks.quality import main

    assert main(["--quick", "--out", str(tmp_path), "--model-path", model_path]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    cfg = result["config"]
    assert cfg["policies"] == ["none", "lava"] and cfg["budgets"] == [64] and cfg["samples"] == 1
    assert result["command"].startswith("python benchmarks/quality.py")
    for key in ("none", "lava@64", "snapkv-avg@64", "kvpress-snapkv@64", "hf-none"):
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
    lava = [r for r in result["runs"]["lava@64"]["records"] if r["task"] != "fidelity" or True]
    assert all(r["kv_compression"] and r["kv_compression"]["policy"] == "lava" for r in lava)
    assert result["reference"]["rows"]
    md = (tmp_path / "quality.md").read_text()
    assert "| passkey | lava |" in md and "query-aware" in md and "kvpress" in md
    for png in ("quality.png", "quality_tasks.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
