"""The multi-turn benchmark's ``--quick`` run end to end: a resend-style ``none`` and a
session-style ``lava:128`` on the same pool and workload (two real servers). It checks what is
measured and written; no performance threshold."""

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

    assert main(["--quick", "--configs", "none@resend", "lava:128", "--baseline", "none@resend",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "multiturn_resend_session_quick.json").read_text())
    runs = {r["config"]: r for r in data["runs"]}
    assert set(runs) == {"none@resend", "lava:128"}
    assert runs["none@resend"]["client"] == "resend" and runs["lava:128"]["client"] == "session"
    for r in runs.values():
        assert not r["errors"] and len(r["turns"]) == 3 and r["wall_s"] > 0
        assert all(len(conv) == 3 for conv in r["conversations"])
    # resend under none: the tree serves the history; a session under lava: only the new tokens
    for conv in runs["lava:128"]["conversations"]:
        assert conv[0]["compressed"]
        for turn in conv[1:]:
            assert turn["prefilled_tokens"] == 150 + 1  # the new tokens and the previous answer's last token
            assert turn["compressed"]
    for conv in runs["none@resend"]["conversations"]:
        assert all(turn["prefilled_tokens"] <= 150 + 2 for turn in conv[1:]), conv
    none_slots = runs["none@resend"]["turns"][-1]["private_slots_mean"]
    assert runs["lava:128"]["turns"][-1]["private_slots_mean"] < none_slots
    md = (tmp_path / "multiturn_resend_session_quick.md").read_text()
    assert "Ratios: to `none@resend`" in md and "| lava:128 |" in md
    assert (tmp_path / "multiturn_resend_session_quick.png").stat().st_size > 10_000
