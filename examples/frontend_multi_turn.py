"""SGLang frontend language: a multi-turn chat over one long document (``sgl.function``).

    python examples/frontend_multi_turn.py --url http://127.0.0.1:30000

against a server started with a policy, e.g. ``--kv-policy lava --kv-budget 128``.

The program is a loop of ``user`` / ``assistant`` turns: the first user message carries a long
document, each later one a short question about it. The frontend keeps the conversation's text
and sends all of it with every ``gen``: a client that resends the whole history, with no
session. What happens on the server:

* turn 1 (document + first question) is compressed after prefill; when it finishes, its
  compressed state is *parked* (``--kv-park``, on by default), keyed by its token ids;
* turn 2's text is turn 1's text, the answer and the new question: its token ids extend the
  parked conversation, so it continues over the compressed state, prefills only the new
  question (``cached`` ≈ everything before it), re-selects the history within the budget, and
  is parked again for turn 3.

The frontend's ``gen`` has no ``custom_params``, so every turn uses the server's policy; the
per-turn report comes from the native API's ``meta_info["kv_compression"]``.
"""

from __future__ import annotations

import argparse
import uuid

import sglang as sgl

from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

FACTS = [("the colour of the lighthouse", "green"), ("the name of the ship", "Albatross"),
         ("the number of the locker", "4172"), ("the city of the meeting", "Lisbon")]


@sgl.function
def document_chat(s, document, questions):
    s += sgl.system("You answer questions about the user's document in a few words.")
    for i, question in enumerate(questions):
        text = ("Document:\n" + document + "\n\n" if i == 0 else "") + "Question: " + question
        s += sgl.user(text)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=12, temperature=0))
    s["meta"] = [s.get_meta_info(f"answer_{i}") or {} for i in range(len(questions))]


def build(n_turns: int, doc_tokens: int, seed: int):
    corpus = load_corpus(default_corpus_dir())
    filler = f"(copy {uuid.uuid4().hex[:8]}) " + haystack(doc_tokens, corpus, seed)
    facts = [FACTS[i % len(FACTS)] for i in range(n_turns)]
    parts, step = [], max(1, len(filler) // (len(facts) + 1))
    for i, (what, value) in enumerate(facts):  # one sentence per fact, spread over the document
        cut = filler.rfind(". ", 0, (i + 1) * step) + 2
        parts.append(f"Note: {what} is {value}. ")
        filler = filler[:cut] + parts[-1] + filler[cut:]
    return filler, [f"What is {what}?" for what, _ in facts], [value for _, value in facts]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--doc-tokens", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)

    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    document, questions, answers = build(args.turns, args.doc_tokens, args.seed)
    state = document_chat.run(document=document, questions=questions)
    print(f"document: ~{args.doc_tokens} tokens in turn 1; {args.turns} turns, the frontend resending the history")
    rows = []
    for i, (question, meta) in enumerate(zip(questions, state["meta"])):
        report = (meta.get("kv_compression") or [None])[0]
        answer = state[f"answer_{i}"]
        rows.append({"turn": i + 1, "question": question, "answer": answer, "expected": answers[i], "report": report,
                     "prompt_tokens": meta.get("prompt_tokens"), "cached_tokens": meta.get("cached_tokens")})
        line = (f"turn {i + 1}: {question!r} -> {answer.strip()!r} (expected {answers[i]!r}); "
                f"prompt={meta.get('prompt_tokens')} cached={meta.get('cached_tokens')}")
        if report:
            how = "continued the parked conversation" if report.get("continued") else "compressed"
            line += f"; {how}: holds {report['slots_held']} slots"
        else:
            line += "; not compressed"
        print(line)
    return {"rows": rows}


if __name__ == "__main__":
    main()
