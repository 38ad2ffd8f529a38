"""Multi-turn agent loop: many conversations share one long system prompt with tool descriptions.

    python examples/multi_turn_agent.py --url http://127.0.0.1:30000 [--sessions 3 --turns 2]

against a server started with a policy, e.g. ``--kv-policy lava --kv-budget 128`` (add
``--enable-streaming-session`` for the session-id client style).

Every conversation starts with the same system prompt (a tool catalogue, several hundred
tokens); each turn the user pastes a long tool result (a few hundred tokens) and asks a
question. The loop runs all conversations concurrently, in three configurations:

* ``none, resend``: ``custom_params={"kv_policy": "none"}`` (SGLang unchanged), the client
  resending the whole history each turn (what OpenAI-style chat clients do); the radix tree
  serves the history;
* ``lava, resend``: the server's policy, the same client. A compressed turn is never published
  to the tree, but when it finishes it is *parked* (``--kv-park``, on by default): turn 2's
  input extends it, so turn 2 continues over the compressed state and prefills only the new
  message;
* ``lava, session``: the server's policy, a streaming session per conversation (``session_params``),
  each turn sending only its new text; the session keeps the compressed row.

Each turn prints ``cached`` (prompt tokens not prefilled: the radix tree's hit, or the parked /
session state) and ``held`` (the KV slots the conversation's own context occupies beyond the
shared system prompt: without compression its whole private context, with compression the
slots it kept, ``slots_held - shared_prefix_tokens`` of ``meta_info["kv_compression"]``).

The system prompt is primed once with a ``max_new_tokens=0`` request (requests that end at
prefill are never compressed, so it enters the tree at full size), as SGLang's frontend does
for shared prefixes. The prompt is rendered with the served model's chat template when the
tokenizer can be loaded from ``/model_info``'s path, else in ChatML.
"""

from __future__ import annotations

import argparse
import json
import threading
import urllib.error
import urllib.request
import uuid

from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

TOOLS = [
    ("search_docs", "Full-text search over the internal knowledge base.", {"query": "string", "top_k": "integer"}),
    ("read_file", "Read a file from the project workspace and return its text.", {"path": "string"}),
    ("run_sql", "Run a read-only SQL query against the analytics warehouse.", {"sql": "string", "limit": "integer"}),
    ("send_email", "Send an email on behalf of the user after explicit confirmation.", {"to": "string", "subject": "string", "body": "string"}),
    ("create_ticket", "Open a ticket in the issue tracker.", {"title": "string", "priority": "low|medium|high"}),
    ("get_weather", "Current weather and a three-day forecast for a city.", {"city": "string"}),
    ("calendar_lookup", "List the user's meetings between two dates.", {"start": "date", "end": "date"}),
    ("translate", "Translate a text into another language.", {"text": "string", "target": "language code"}),
]


END_OF_TURN = "<|im_end|>"  # ChatML (the default model's template, and the fallback renderer's)


def system_prompt(extra_tokens: int) -> str:
    lines = ["You are a careful assistant that can call tools. Call a tool by answering with one JSON object "
             '{"tool": NAME, "arguments": {...}}; otherwise answer the user briefly.', "", "Available tools:"]
    for name, description, params in TOOLS:
        lines.append(f"- {name}: {description} Parameters: {json.dumps(params)}. Returns JSON; errors come back as "
                     f'{{"error": MESSAGE}}. Never call {name} with made-up arguments; ask the user instead.')
    lines += ["", "House style guide (follow it in every answer):", haystack(extra_tokens, load_corpus(default_corpus_dir()), 7)]
    return "\n".join(lines)


class Renderer:
    def __init__(self, url: str):
        self.tokenizer = None
        try:
            with urllib.request.urlopen(url + "/model_info", timeout=60) as r:
                path = json.loads(r.read().decode())["tokenizer_path"]
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception:
            pass

    def __call__(self, messages, generation_prompt: bool = True) -> str:
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def post(url: str, payload: dict, path: str = "/generate"):
    req = urllib.request.Request(url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        body = r.read().decode()
    return json.loads(body) if body.strip().startswith(("{", "[", '"')) else body


def run_session(url, render, system, shared_len, sid, turns, result_tokens, max_tokens, custom, style, seed, out):
    """One conversation. ``style``: ``resend`` (the whole history each turn) or ``session`` (a
    streaming session; each turn sends the text the session does not hold yet)."""
    corpus = load_corpus(default_corpus_dir())
    messages = [{"role": "system", "content": system}]
    session = post(url, {"capacity_of_str_len": 1 << 22, "streaming": True}, "/open_session") if style == "session" else None
    rows, held_text = [], ""
    try:
        for turn in range(turns):
            result = haystack(result_tokens, corpus, seed + 31 * turn)
            messages.append({"role": "user", "content": f"[conversation {sid}] Tool result of search_docs:\n{result}\n\n"
                                                        f"Question {turn + 1}: summarise the tool result in one sentence."})
            full = render(messages)
            payload = {"sampling_params": {"max_new_tokens": max_tokens, "temperature": 0}}
            if session is None:
                payload["text"] = full
            else:  # the text after what the session holds (its prompts and answers so far)
                assert full.startswith(held_text), "the chat template does not extend the history"
                payload["text"] = full[len(held_text):]
                payload["session_params"] = {"id": session}
            if custom:
                payload["sampling_params"]["custom_params"] = custom
            out_json = post(url, payload)
            meta = out_json["meta_info"]
            report = (meta.get("kv_compression") or [None])[0]
            if report:
                held = report["slots_held"] - report["shared_prefix_tokens"]
            else:
                held = meta["prompt_tokens"] - shared_len
            rows.append({"turn": turn + 1, "prompt_tokens": meta["prompt_tokens"], "cached_tokens": meta["cached_tokens"],
                         "held_slots": held + meta["completion_tokens"], "compressed": report is not None, "report": report,
                         "continued": bool(report and report.get("continued")), "text": out_json["text"]})
            messages.append({"role": "assistant", "content": out_json["text"]})
            # the session holds the answer's tokens, and the end-of-turn token when it stopped on it
            stopped = (meta.get("finish_reason") or {}).get("type") == "stop"
            held_text = full + out_json["text"] + (END_OF_TURN if stopped else "")
    finally:
        if session is not None:
            post(url, {"session_id": session}, "/close_session")
    out[sid] = rows


def run_policy(url, render, system, shared_len, args, label, custom, style):
    out, threads = {}, []
    tag = uuid.uuid4().hex[:6]
    for i in range(args.sessions):
        sid = f"{label}-{tag}-{i}"
        t = threading.Thread(target=run_session, args=(url, render, system, shared_len, sid, args.turns, args.result_tokens,
                                                       args.max_tokens, custom, style, args.seed + 1000 * i, out))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return [out[k] for k in sorted(out)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--system-tokens", type=int, default=400, help="style-guide text added to the tool catalogue")
    parser.add_argument("--result-tokens", type=int, default=300, help="length of each turn's tool result")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")

    render = Renderer(url)
    system = system_prompt(args.system_tokens)
    prime = post(url, {"text": render([{"role": "system", "content": system}], generation_prompt=False),
                       "sampling_params": {"max_new_tokens": 0}})
    shared_len = prime["meta_info"]["prompt_tokens"]
    print(f"shared system prompt: {shared_len} tokens ({len(TOOLS)} tools), primed once; "
          f"{args.sessions} sessions x {args.turns} turns, ~{args.result_tokens}-token tool result per turn")

    results = {}
    configs = [("none, resend", {"kv_policy": "none"}, "resend"), ("lava, resend", None, "resend"),
               ("lava, session", None, "session")]
    for label, custom, style in configs:
        try:
            sessions = run_policy(url, render, system, shared_len, args, label.split(",")[0], custom, style)
        except urllib.error.HTTPError as exc:
            if style != "session":
                raise
            print(f"\n[{label}] skipped: the server refused a session ({exc}); start it with --enable-streaming-session")
            continue
        results[label] = sessions
        print(f"\n[{label}]")
        for i, rows in enumerate(sessions):
            cells = []
            for r in rows:
                tag = ("continued" if r["continued"] else f"compressed->{r['report']['policy']}") if r["compressed"] else "full"
                cells.append(f"turn {r['turn']}: prompt={r['prompt_tokens']:4d} cached={r['cached_tokens']:4d} "
                             f"held={r['held_slots']:4d} ({tag})")
            print(f"  conversation {i}: " + " | ".join(cells))
        last = sum(rows[-1]["held_slots"] for rows in sessions)
        print(f"  KV slots held by all conversations at their last turn (beyond the shared prompt): {last}")
    return {"shared_len": shared_len, "results": results}


if __name__ == "__main__":
    main()
