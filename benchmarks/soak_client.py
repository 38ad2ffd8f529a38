"""The soak's clients (``benchmarks.soak``): what one request, one session or one resend
conversation sends and checks. Every request is tracked by the stall watch
(``benchmarks.soak_safety.StallWatch``)."""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
import urllib.request

from lava_sglang.config import POLICIES
from lava_sglang.launch import drop, http_json, open_generate, post_generate, sse_events

from benchmarks.soak_safety import aborted_too_long, bad_request, too_long


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.errors: list[str] = []
        self.incomplete: list[str] = []
        self.mismatches: list[dict] = []
        # completed non-streamed compressed requests that were retracted: (ids, sampling, output ids)
        self.retracted: list[tuple] = []
        self.latencies: list[float] = []

    def add(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def error(self, msg):
        with self.lock:
            self.counts["errors"] += 1
            if len(self.errors) < 50:
                self.errors.append(msg)


def logprob_fields(rng, n_prompt: int, p: float) -> dict:
    """Now and then prompt logprobs (``return_logprob`` from ``logprob_start_len``; with ``lpm`` and
    a continued turn this once took the scheduler down)."""
    if rng.random() >= p:
        return {}
    return {"return_logprob": True, "logprob_start_len": rng.choice([0, max(0, n_prompt // 2)])}


class Soak:
    RIDS = itertools.count()

    def __init__(self, args, server, tokens: list[int], watch):
        self.args, self.server, self.tokens, self.watch = args, server, tokens, watch
        self.stats = Stats()
        self.prefixes: list[list[int]] = []

    # --- prompts -------------------------------------------------------------------------
    def slice(self, rng, n):
        start = rng.randrange(0, len(self.tokens) - n - 1)
        return self.tokens[start:start + n]

    def prompt(self, rng):
        a = self.args
        kind = rng.choice(["short", "budget", "long", "chunks"])
        n = {"short": rng.randint(8, 60), "budget": rng.randint(a.budget - 24, a.budget + 40),
             "long": rng.randint(a.long // 2, a.long), "chunks": rng.randint(2 * a.chunk + 1, 4 * a.chunk)}[kind]
        n = max(4, min(n, a.pool // 3))
        if self.prefixes and rng.random() < 0.3:
            prefix = rng.choice(self.prefixes)
            return "prefix", prefix + self.slice(rng, max(4, n - len(prefix)))
        return kind, self.slice(rng, n)

    def prime_prefixes(self, rng, n=3, length=256):
        for _ in range(n):
            ids = self.slice(rng, length)
            out = http_json(self.server.url + "/generate",
                            {"input_ids": ids, "sampling_params": {"max_new_tokens": 0, "temperature": 0.0}})
            assert not out["meta_info"].get("kv_compression"), "a primer was compressed"
            self.prefixes.append(ids)

    def generate(self, payload: dict, what: str) -> dict:
        with self.watch.track(what):
            return http_json(self.server.url + "/generate", payload, timeout=900)

    # --- one request ---------------------------------------------------------------------
    def sampling(self, rng, custom=None):
        sp = {"max_new_tokens": rng.randint(1, self.args.max_new), "temperature": 0.0,
              "ignore_eos": rng.random() < 0.5}
        if custom and custom.pop("kv_primer", False):
            sp["max_new_tokens"] = 0
        elif custom and custom.get("kv_decode_budget"):  # compressed during decode: longer outputs
            sp["max_new_tokens"] = rng.randint(1, 8 * self.args.max_new)
            if rng.random() < self.args.beyond_pool_output:
                sp["max_new_tokens"], sp["ignore_eos"] = self.args.pool + rng.randint(1, 200), True
                self.stats.add("output_beyond_pool")
        if custom:
            sp["custom_params"] = custom
        return sp

    def random_custom(self, rng, edge: bool = False):
        r = rng.random()
        if r < 0.15:
            return None  # the server's policy and budget
        custom = {"kv_policy": rng.choice(POLICIES)}
        if custom["kv_policy"] != "none" and rng.random() < 0.8:
            custom["kv_budget"] = rng.choice([48, 64, 96, 128, 256])
        if custom["kv_policy"] != "none" and rng.random() < self.args.chunked_share:
            custom["kv_prefill_compression"] = "chunked"  # compressed during chunked prefill
            if edge and rng.random() < 0.3:
                self.edge_settings(rng, custom)
        if custom["kv_policy"] != "none" and "kv_window" not in custom and rng.random() < self.args.decode_share:
            custom["kv_decode_budget"] = rng.choice([64, 96, 128, 256])  # compressed during decode
            custom["kv_decode_interval"] = rng.choice([32, 64, 128])
        return custom

    def edge_settings(self, rng, custom) -> None:
        """Settings at the edge of the admission rule (``chunked.not_chunkwise``): a window or a
        minimum prompt length just under, at or over the chunk, or (``kv_primer``, taken out
        by :meth:`sampling`) a prefix primer."""
        chunk = self.args.chunk
        what = rng.choice(["window", "min_prompt_len", "primer"])
        if what == "window":
            custom["kv_window"] = rng.choice([chunk - 1, chunk, chunk + 1])
            custom["kv_budget"] = custom["kv_window"] + rng.choice([1, 64])
        elif what == "min_prompt_len":
            custom["kv_min_prompt_len"] = rng.choice([chunk - 1, chunk, chunk + 1, 2 * chunk])
        else:
            custom["kv_primer"] = True

    def refused_beyond_pool(self, custom, sp) -> bool:
        """Whether a prompt longer than the pool with these settings must be refused: it would not
        be selected after every full chunk."""
        chunk = self.args.chunk
        return (sp["max_new_tokens"] == 0 or int(custom.get("kv_window", 32)) > chunk
                or int(custom.get("kv_min_prompt_len", 0)) > chunk)

    def beyond_pool(self, rng, custom) -> list[int] | None:
        """A prompt longer than the pool, for a share of the chunked requests (served only because
        they are compressed chunk by chunk); None otherwise."""
        a = self.args
        if (custom or {}).get("kv_prefill_compression") != "chunked" or rng.random() >= 0.25:
            return None
        return self.slice(rng, rng.randint(a.pool + 1, min(2 * a.pool, a.context - 200)))

    def run_one(self, rng):
        r = rng.random()
        if r < 0.05:
            return bad_request(self, rng)
        if r < 0.15:
            return self.exact_check(rng)
        if r < 0.25:
            return self.conversation(rng)
        if r < 0.37:
            return self.resend_conversation(rng)
        return self.single(rng)

    def single(self, rng):
        s = self.stats
        kind, ids = self.prompt(rng)
        custom = self.random_custom(rng, edge=True)
        longer = self.beyond_pool(rng, custom)
        if longer is not None:
            kind, ids = "beyond_pool", longer
        if (custom or {}).get("kv_prefill_compression"):
            self.stats.add("chunked")
        if (custom or {}).get("kv_decode_budget"):
            self.stats.add("decode")
        edge = any(k in (custom or {}) for k in ("kv_window", "kv_min_prompt_len", "kv_primer"))
        sp = self.sampling(rng, custom)
        expect_400 = longer is not None and self.refused_beyond_pool(custom, sp)
        stream = rng.random() < 0.5 and not edge
        abort = rng.random() < 0.12 and not edge
        payload = {"input_ids": ids, "sampling_params": sp, "stream": stream,
                   **({} if edge else logprob_fields(rng, len(ids), self.args.logprob_share))}
        if self.args.priority_scheduling:
            payload["priority"] = rng.randint(0, 3)
        if edge:
            s.add("edge")
        s.add(f"kind_{kind}")
        s.add("streaming" if stream else "non_streaming")
        if "return_logprob" in payload:
            s.add("with_logprob")
        started = time.time()
        with self.watch.track(f"{kind} {custom} stream={stream}"):
            conn = open_generate(self.server.port, payload, timeout=900.0)
            try:
                if abort:
                    s.add("aborted")
                    if stream:
                        resp = conn.getresponse()
                        stop_after = rng.randint(0, 8)
                        for i, _ in enumerate(sse_events(resp)):
                            if i >= stop_after:
                                break
                    else:
                        time.sleep(rng.uniform(0.0, 2.0))
                    drop(conn)
                    return
                resp = conn.getresponse()
                if resp.status >= 500:
                    s.error(f"HTTP {resp.status}: {resp.read()[:300]!r}")
                    return
                if resp.status == 400 and expect_400:
                    s.add("rejected_expected")
                    return
                if resp.status != 200:
                    s.error(f"unexpected HTTP {resp.status} for a valid request: {resp.read()[:300]!r}")
                    return
                if expect_400:
                    s.error(f"served a prompt longer than the pool that must be refused: {custom} {sp}")
                    return
                if stream:
                    last = None
                    for event in sse_events(resp):
                        if "error" in event:
                            s.error(f"stream error: {event['error']}")
                            return
                        last = event
                    out = last
                else:
                    out = json.loads(resp.read())
            finally:
                conn.close()
        if self.check_complete(out, sp, f"{kind} {custom} stream={stream}") and not stream:
            meta = out["meta_info"]
            if meta.get("num_retractions") and meta.get("kv_compression") and "return_logprob" not in payload \
                    and not (custom or {}).get("kv_decode_budget"):  # a decode-compressed one is not replayed
                with s.lock:
                    if len(s.retracted) < 40:
                        s.retracted.append((ids, sp, out["output_ids"]))
        s.latencies.append(time.time() - started)

    def check_complete(self, out, sp, what):
        s = self.stats
        if out is None:
            s.incomplete.append(f"{what}: no output")
            s.add("incomplete")
            return
        meta = out["meta_info"]
        finish = (meta.get("finish_reason") or {}).get("type")
        n = meta.get("completion_tokens")
        ok = finish in ("length", "stop") and n is not None and min(1, sp["max_new_tokens"]) <= n <= sp["max_new_tokens"]
        if sp.get("ignore_eos"):
            ok = ok and finish == "length" and n == sp["max_new_tokens"]
        if not ok:
            s.add("incomplete")
            if len(s.incomplete) < 50:
                s.incomplete.append(f"{what}: finish={meta.get('finish_reason')} tokens={n} of {sp['max_new_tokens']}")
            return False
        s.add("completed")
        if meta.get("kv_compression"):
            s.add("compressed")
            if meta["kv_compression"][0].get("decode_selections"):
                s.add("decode_compressed")
        if meta.get("num_retractions"):
            s.add("retracted")
            s.add("retractions", int(meta["num_retractions"]))
        if meta.get("cached_tokens"):
            s.add("with_cached_prefix")
        return True

    def retraction_checks(self, limit: int = 20) -> None:
        """After the load: retracted compressed requests served again alone (no memory pressure)
        must give the same greedy tokens (the re-prefill replays their selection)."""
        s = self.stats
        for ids, sp, output_ids in s.retracted[:limit]:
            out = http_json(self.server.url + "/generate", {"input_ids": ids, "sampling_params": sp})
            s.add("retraction_checks")
            if out["meta_info"].get("num_retractions"):
                s.add("retraction_checks_retracted_again")
            if out["output_ids"] != output_ids:
                s.mismatches.append({"retracted": True, "custom": sp.get("custom_params"), "prompt_tokens": len(ids),
                                     "a": output_ids, "b": out["output_ids"]})
                s.add("retraction_mismatches")

    def exact_check(self, rng):
        """A budget covering the prompt keeps everything: same greedy tokens as kv_policy=none."""
        _, ids = self.prompt(rng)
        policy = rng.choice([p for p in POLICIES if p != "none"])
        sp = {"max_new_tokens": rng.randint(4, self.args.max_new), "temperature": 0.0, "ignore_eos": True}
        outs = []
        mode = rng.choice(["after", "chunked"])  # chunked: never selected, as after
        for custom in ({"kv_policy": policy, "kv_budget": self.args.pool * 4, "kv_prefill_compression": mode},
                       {"kv_policy": "none"}):
            out = self.generate({"input_ids": ids, "sampling_params": {**sp, "custom_params": custom}}, f"exact {custom}")
            self.check_complete(out, sp, f"exact {custom}")
            outs.append(out)
        self.stats.add("exact_checks")
        if outs[0]["output_ids"] != outs[1]["output_ids"]:
            with self.stats.lock:
                self.stats.mismatches.append({"policy": policy, "prompt_tokens": len(ids),
                                              "a": outs[0]["output_ids"], "b": outs[1]["output_ids"]})

    def conversation(self, rng):
        """A streaming session of 2-4 turns continuing over its (compressed) cache."""
        s = self.stats
        sid = http_json(self.server.url + "/open_session", {"capacity_of_str_len": 1 << 22, "streaming": True})
        s.add("sessions")
        try:
            for t in range(rng.randint(2, 4)):
                _, ids = self.prompt(rng)
                custom = self.random_custom(rng)
                sp = self.sampling(rng, custom)
                if t == 0 and rng.random() < 0.2:
                    sp["max_new_tokens"] = 0  # a context turn, questioned by the next one
                payload = {"input_ids": ids, "sampling_params": sp, "session_params": {"id": sid}}
                if rng.random() < 0.08:
                    s.add("session_turns_aborted")
                    conn = open_generate(self.server.port, payload, timeout=900.0)
                    time.sleep(rng.uniform(0.0, 1.5))
                    drop(conn)
                    break  # the session's next turns would start from its last finished turn
                out = self.generate(payload, f"session turn {t + 1} {custom}")
                s.add("session_turns")
                if t and out["meta_info"].get("cached_tokens", 0) == 0:
                    s.error(f"session turn {t + 1} reused nothing: {out['meta_info']}")
                if sp["max_new_tokens"] == 0:
                    continue
                self.check_complete(out, sp, f"session turn {t + 1} {custom}")
                if (out["meta_info"].get("kv_compression") or [{}])[0].get("continued"):
                    s.add("session_turns_continued")
        finally:
            req = urllib.request.Request(self.server.url + "/close_session", data=json.dumps({"session_id": sid}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                resp.read()

    def resend_conversation(self, rng):
        """2-4 turns of a client that resends the whole history (no session): parked conversations.
        Half of them send the same ``rid`` on every turn (an OpenAI-style client with a fixed id);
        some turns ask for prompt logprobs. A history grown past the pool's input limit may be
        refused (HTTP 400): that ends the conversation and is no error."""
        s = self.stats
        s.add("resend_conversations")
        custom = self.random_custom(rng)
        rid = f"soak-conv-{next(self.RIDS)}" if rng.random() < 0.5 else None
        if rid:
            s.add("resend_conversations_same_rid")
        history = []
        for t in range(rng.randint(2, 4)):
            _, ids = self.prompt(rng)
            history = history + ids
            sp = self.sampling(rng, custom)
            sp["ignore_eos"] = True
            if t and rng.random() < 0.1:
                sp["custom_params"] = {**(custom or {}), "kv_park": False}
            payload = {"input_ids": history, "sampling_params": sp,
                       **logprob_fields(rng, len(history), self.args.logprob_share)}
            if rid:
                payload["rid"] = rid
            if rng.random() < 0.08:
                s.add("resend_turns_aborted")
                conn = open_generate(self.server.port, payload, timeout=900.0)
                time.sleep(rng.uniform(0.0, 1.5))
                drop(conn)
                return
            what = f"resend turn {t + 1} {sp.get('custom_params')} rid={rid} logprob={'return_logprob' in payload}"
            with self.watch.track(what):
                status, body = post_generate(self.server.port, payload, timeout=900.0)
            if too_long(status, body):
                s.add("rejected_too_long")
                return
            if status != 200:
                s.error(f"{what}: HTTP {status} {body[:300]}")
                return
            out = json.loads(body)
            if aborted_too_long(out):
                s.add("rejected_too_long")
                return
            s.add("resend_turns")
            if "return_logprob" in payload:
                s.add("resend_turns_with_logprob")
            if not self.check_complete(out, sp, what):
                return
            if (out["meta_info"].get("kv_compression") or [{}])[0].get("continued"):
                s.add("resend_turns_continued")
                if rid:
                    s.add("resend_turns_continued_same_rid")
            history = history + out["output_ids"]

    # --- driver --------------------------------------------------------------------------
    def worker(self, k, deadline):
        import random

        rng = random.Random(self.args.seed * 1000 + k)
        while time.time() < deadline:
            try:
                self.run_one(rng)
                self.stats.add("sent")
            except Exception as exc:  # noqa: BLE001 - every unexpected failure is a counted error
                self.stats.error(f"{type(exc).__name__}: {exc}")
