"""Quality benchmark: the samples through one server (or through HF + kvpress), as records.

A server is a :class:`lava_sglang.launch.Server` (or :class:`RemoteServer` for ``--url``): its
``generate`` sends a greedy request, its ``open_session`` / ``close_session`` the streaming
sessions of the query-agnostic protocol.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from benchmarks.quality_bench.metrics import AGNOSTIC, TOP_LOGPROBS
from benchmarks.tasks import Sample, score
from lava_sglang.launch import Server

SESSION_CAPACITY = 1_000_000  # capacity_of_str_len of a sample's session


class RemoteServer:
    """A server started elsewhere (``--url``): the HTTP helpers of :class:`Server`, no process."""

    generate = Server.generate
    open_session = Server.open_session
    close_session = Server.close_session
    flush_cache = Server.flush_cache

    def __init__(self, url: str):
        self.url = url.rstrip("/")


def agnostic_split(tok, sample: Sample) -> tuple[list[int], int, bool]:
    """The query-aware prompt's token ids (context + question tokenized together, as the server
    tokenizes the text), the number that belong to the context, and whether that boundary is
    exactly the end of the context text (else a token straddles it and goes with the context; see
    :func:`benchmarks.kvpress_reference.split_ids`). A sample without a question (``fidelity``)
    sends its last token as the second turn (a turn needs at least one new token): not exact."""
    from benchmarks.kvpress_reference import split_ids  # torch: loaded only by the query-agnostic protocol

    ids, n_ctx = split_ids(tok, sample.context, sample.question)
    if n_ctx >= len(ids):
        return ids, len(ids) - 1, False
    enc = tok(sample.context + sample.question, return_offsets_mapping=True)
    return ids, n_ctx, enc["offset_mapping"][n_ctx - 1][1] == len(sample.context)


def open_session(server) -> str:
    """A streaming session (``POST /open_session``); its id."""
    sid = server.open_session(SESSION_CAPACITY)
    if not isinstance(sid, str) or not sid:
        raise RuntimeError(f"/open_session returned {sid!r} (was the server started with --enable-streaming-session?)")
    return sid


def _kwargs_for(s: Sample, params: Optional[dict], logprobs: bool = True) -> dict:
    """``generate`` keywords of a sample: top-k logprobs for fidelity, ``custom_params`` when given."""
    kwargs = {}
    if s.metric == "fidelity" and logprobs:
        kwargs = {"return_logprob": True, "top_logprobs_num": TOP_LOGPROBS}
    if params:
        kwargs["sampling_params"] = {"custom_params": dict(params)}
    return kwargs


def _finish(s: Sample, out: dict, rec: dict, seconds: float, label: str, log) -> dict:
    """Add the score (or the fidelity top-k logprobs) to ``rec`` and log the sample's line."""
    meta = out.get("meta_info", {})
    if s.metric == "fidelity":
        rec["top_logprobs"] = [[[t[0], t[1]] for t in step] for step in meta.get("output_top_logprobs", [])]
    else:
        rec["score"] = score(s, out["text"])
    log(f"  [{label}] {s.task} seed={s.seed} {seconds:.1f}s -> {out['text'][:60]!r}"
        + (f" score={rec['score']:.2f}" if "score" in rec else "")
        + (f" slots={rec['slots_held']}" if rec.get("slots_held") is not None else ""))
    return rec


def _one(server, s: Sample, label: str, log, custom: Optional[dict]) -> dict:
    """Query-aware: the whole prompt in one request."""
    t0 = time.perf_counter()
    out = server.generate(s.prompt, max_new_tokens=s.max_new_tokens, **_kwargs_for(s, custom))
    seconds = time.perf_counter() - t0
    meta = out.get("meta_info", {})
    report = (meta.get("kv_compression") or [None])[0]
    rec = {"task": s.task, "seed": s.seed, "n_tokens": s.n_tokens, "text": out["text"],
           "output_ids": out.get("output_ids"), "prompt_tokens": meta.get("prompt_tokens"), "seconds": round(seconds, 3),
           "kv_compression": report,
           "slots_held": report.get("slots_held") if report else meta.get("prompt_tokens")}
    return _finish(s, out, rec, seconds, label, log)


def _one_agnostic(server, s: Sample, label: str, log, custom: Optional[dict], tok,
                  question_custom: Optional[dict]) -> dict:
    """Query-agnostic: the context turn, then the question turn, in one streaming session."""
    ids, n_ctx, exact = agnostic_split(tok, s)
    t0 = time.perf_counter()
    sid = open_session(server)
    try:
        session = {"session_params": {"id": sid}}
        first = server.generate(input_ids=ids[:n_ctx], max_new_tokens=0, **_kwargs_for(s, custom, logprobs=False),
                                **session)
        t1 = time.perf_counter()
        params = custom if question_custom is None else question_custom
        out = server.generate(input_ids=ids[n_ctx:], max_new_tokens=s.max_new_tokens, **_kwargs_for(s, params),
                              **session)
    finally:
        server.close_session(sid)
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
    return _finish(s, out, rec, t2 - t0, label, log)


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
    if protocol == AGNOSTIC and tok is None:
        raise ValueError("the query-agnostic protocol needs the tokenizer (tok)")
    if protocol == AGNOSTIC:
        def run_one(s):
            return _one_agnostic(server, s, label, log, custom, tok, question_custom)
    else:
        def run_one(s):
            return _one(server, s, label, log, custom)
    if concurrency <= 1:
        return [run_one(s) for s in samples]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(run_one, samples))


def run_hf_reference(model, tok, samples: list[Sample], modes: dict, protocol: str, log=print) -> dict:
    """The research-harness side: every sample through HF transformers + kvpress, one prefill per
    sample for all ``modes`` (``key -> (mode, budget)``, see
    :func:`benchmarks.kvpress_reference.hf_generate_many`); returns ``key -> records``."""
    from benchmarks.kvpress_reference import hf_generate_many  # torch + kvpress: only for the reference check

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
