"""Plain OpenAI client, long context, per-request KV budget.

Start a server with the plugin, e.g.

    python -m sglang.launch_server --model-path $(python -m lava_sglang.models) --kv-policy lava --kv-budget 128

(on CPU add ``--device cpu --attention-backend torch_native --dtype float32`` and
``SGLANG_USE_CPU_ENGINE=1``), then

    python examples/openai_long_context.py --url http://127.0.0.1:30000

The same ~1.4k-token passkey prompt is sent three times through the OpenAI completions API:
with the server's default settings, with a per-request budget
(``extra_body={"custom_params": {"kv_budget": 64}}``) and with compression switched off for
that request (``{"kv_policy": "none"}``). Completions responses do not carry the plugin's
per-request report (SGLang 0.5.23 ignores ``return_meta_info`` there; a non-streamed chat
completion with ``return_meta_info: true`` has it, docs/guides.md), so the example reads the
server's compression counters from ``GET /server_info`` before and after each request.

The prompt starts with a run-unique line: a prompt that an uncompressed request has already
published to the radix tree would be reused as a shared prefix on the next run, and a shared
prefix is never compressed.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
import uuid

from openai import OpenAI

from lava_sglang.workloads import default_corpus_dir, load_corpus, passkey_task


def server_counters(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/server_info", timeout=60) as r:
        info = json.loads(r.read().decode())
    states = info.get("internal_states") or [{}]
    return states[0].get("kv_compression") or {}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--tokens", type=int, default=1400, help="approximate prompt length")
    parser.add_argument("--budget", type=int, default=64, help="per-request kv_budget")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key="EMPTY")
    model = client.models.list().data[0].id
    task = passkey_task(args.tokens, seed=args.seed, depth=0.35, corpus=load_corpus(default_corpus_dir()))
    prompt = f"[run {uuid.uuid4().hex[:12]}]\n" + task.prompt
    print(f"model: {model}")
    print(f"prompt: ~{args.tokens} tokens, passkey {task.answer} at depth {task.depth:.2f}")

    runs = [("server default", None), (f"kv_budget={args.budget}", {"kv_budget": args.budget}),
            ("kv_policy=none", {"kv_policy": "none"})]
    results = {}
    for label, custom in runs:
        before = server_counters(args.url)
        extra = {"custom_params": custom} if custom else None
        out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                        extra_body=extra)
        after = server_counters(args.url)
        compressed = after.get("compressed_requests", 0) - before.get("compressed_requests", 0)
        freed = after.get("freed_slots", 0) - before.get("freed_slots", 0)
        text = out.choices[0].text
        results[label] = {"text": text, "prompt_tokens": out.usage.prompt_tokens, "compressed": compressed,
                          "freed_slots": freed, "found": task.answer in text}
        print(f"{label:>16}: {text.strip()!r:24} prompt_tokens={out.usage.prompt_tokens} "
              f"compressed={compressed} freed_slots={freed} passkey_found={task.answer in text}")
    return results


if __name__ == "__main__":
    main()
