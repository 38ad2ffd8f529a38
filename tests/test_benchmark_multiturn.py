"""The multi-turn benchmark's ``--quick`` run end to end: ``lava:128`` conversations whose client
resends the whole history, on one real server (one configuration: the suite's time; ``none`` and
session clients run the same code with other flags). It checks what is measured and written; no
performance threshold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.server


def test_quick_multiturn_run_measures_every_turn(tmp_path):
    from benchmarks.multiturn import main

    assert main(["--quick", "--configs", "lava:128", "--client", "resend", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "multiturn_resend_quick.json").read_text())
    runs = {r["config"]: r for r in data["runs"]}
    a = data["args"]
    # turn 1's private part (the system prompt is cached) exceeds the budget: it is compressed
    assert (a["conversations"], a["turns"]) == (2, 3) and a["turn_tokens"] > 128
    assert set(runs) == {"lava:128"} and runs["lava:128"]["client"] == "resend"
    for r in runs.values():
        assert not r["errors"] and len(r["turns"]) == 3 and r["wall_s"] > 0
        assert all(len(conv) == 3 for conv in r["conversations"])
    # each later turn continues the parked conversation: it prefills only its new tokens, and the
    # conversation holds less than its history
    for conv in runs["lava:128"]["conversations"]:
        assert conv[0]["compressed"]
        for turn in conv[1:]:
            assert turn["prefilled_tokens"] == a["turn_tokens"] + 1  # the new tokens and the previous answer's last token
            assert turn["compressed"] and turn["resident"]
    totals = runs["lava:128"]["server_totals"]
    assert totals["park_hits"] == 2 * 2 and totals["park_evictions"] == 0, totals
    assert runs["lava:128"]["peak_resident"] == 2
    history = 3 * (a["turn_tokens"] + a["output_tokens"])  # private tokens of a conversation by the end of turn 3
    assert runs["lava:128"]["turns"][-1]["private_slots_mean"] < history
    md = (tmp_path / "multiturn_resend_quick.md").read_text()
    assert "| lava:128 |" in md and "Per turn" in md and "parked hits" in md
    assert (tmp_path / "multiturn_resend_quick.png").stat().st_size > 10_000
