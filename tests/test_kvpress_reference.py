"""The kvpress reference harness on the real default model (HF transformers, CPU, no server).

``hf_generate_many`` runs one prefill and lets every kvpress press compress its own copy of the
cache (kvpress's ``forward_hook``); it must give exactly what one ``with press(model)`` prefill
per press gives (``hf_generate``), for SnapKV (physically shorter cache) and AdaKV (head-wise
key masks kept as module state), at two budgets each and a smaller window, in both protocols.
Sized for CI: a ~200-token prompt and 6 new tokens (every press still compresses it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("kvpress")

from benchmarks.kvpress_reference import hf_generate, hf_generate_many, load_hf  # noqa: E402
from benchmarks.tasks import make_samples  # noqa: E402
from lava_sglang.workloads import default_corpus_dir, load_corpus  # noqa: E402


@pytest.fixture(scope="module")
def hf(model_path):
    return load_hf(model_path)


@pytest.mark.parametrize("protocol", ["query-aware", "query-agnostic"])
def test_one_prefill_for_every_press_matches_one_prefill_per_press(hf, protocol):
    model, tok = hf
    corpus = load_corpus(default_corpus_dir("paul_graham_essays"))
    sample = make_samples("niah_single", 200, 1, corpus, tok, 3)[0]
    runs = {"none": ("none", 0), "snap-48": ("kvpress-snapkv", 48), "ada-48": ("kvpress-adakv", 48),
            "ada-96": ("kvpress-adakv", 96), "snap-32-w16": ("kvpress-snapkv", 32, 16)}
    new = 6
    many = hf_generate_many(model, tok, sample.context, sample.question, new, runs, protocol=protocol, top_logprobs=5)
    assert set(many) == set(runs)
    outputs = set()
    for key, (mode, budget, *window) in runs.items():
        one = hf_generate(model, tok, sample.context, sample.question, new, mode=mode, budget=budget,
                          protocol=protocol, top_logprobs=5, window=window[0] if window else 32)
        assert many[key]["output_ids"] == one["output_ids"], key
        a, b = many[key]["top_logprobs"], one["top_logprobs"]
        assert [[t for _, t in step] for step in a] == [[t for _, t in step] for step in b], key
        assert [lp for step in a for lp, _ in step] == pytest.approx([lp for step in b for lp, _ in step], abs=1e-4), key
        assert (many[key]["info"]["compressed_tokens"] > 0) == (mode != "none")  # every press compressed
        outputs.add(repr(one["top_logprobs"][1:]))
    # the budgets really compress: the later tokens' distributions (the first comes from the prefill
    # itself in the query-aware protocol) are not the same for all the runs
    assert len(outputs) > 1
    for layer in model.model.layers:
        assert getattr(layer.self_attn, "masked_key_indices", None) is None
