"""SGLang frontend language: read a long document once, fork into several questions.

    python examples/frontend_fork.py --url http://127.0.0.1:30000

against a server started with a policy, e.g. ``--kv-policy lava --kv-budget 128``.

What happens on the server:

* ``s.fork(n)`` first primes the text so far (the shared document) with a
  ``max_new_tokens=0`` request. Requests that end at prefill are never compressed, so the
  document lands in the radix tree at full size and every branch reuses it.
* Each branch then sends document + its own appendix + its question. The document part is a
  shared prefix (``shared_prefix_tokens`` in the report) and is never compressed; only the
  branch's private part (appendix + question) is scored and compressed.
* A private part is compressed only when it is longer than the budget. A branch that added
  just a one-line question to the shared document would not be compressed at all — which is
  why each branch here carries its own long appendix (a few hundred tokens). That is the honest
  shape of the workload where compression helps with fork: long per-branch context, not short
  questions over one long document.

The frontend's ``gen`` has no ``custom_params``, so branches use the server's default policy.
The per-branch report comes from the native API's ``meta_info["kv_compression"]``.
"""

from __future__ import annotations

import argparse
import uuid

import sglang as sgl

from lava_sglang.workloads import default_corpus_dir, haystack, load_corpus

FACTS = [("the colour of the lighthouse", "green"), ("the name of the ship", "Albatross"),
         ("the number of the locker", "4172"), ("the city of the meeting", "Lisbon")]


@sgl.function
def document_qa(s, document, appendices, questions):
    s += "Read the document and the appendix, then answer the question in a few words.\n\n"
    s += "Document:\n" + document + "\n\n"
    # Wait until the text above is applied. SGLang 0.5.23's fork() checks for pending text *before*
    # syncing its worker thread, so without this it may skip priming the shared prefix.
    s.text()
    branches = s.fork(len(questions))
    for branch, appendix, question in zip(branches, appendices, questions):
        branch += "Appendix:\n" + appendix + "\n\nQuestion: " + question + "\nAnswer:"
        branch += sgl.gen("answer", max_tokens=12, temperature=0, stop="\n")
    s["answers"] = [b["answer"] for b in branches]
    s["reports"] = [(b.get_meta_info("answer") or {}).get("kv_compression", [None])[0] for b in branches]
    s["meta"] = [b.get_meta_info("answer") or {} for b in branches]


def build(n_branches: int, doc_tokens: int, appendix_tokens: int, seed: int):
    corpus = load_corpus(default_corpus_dir())
    document = f"(copy {uuid.uuid4().hex[:8]}) " + haystack(doc_tokens, corpus, seed)
    appendices, questions, answers = [], [], []
    for i in range(n_branches):
        what, value = FACTS[i % len(FACTS)]
        filler = haystack(appendix_tokens, corpus, seed + 100 + i)
        cut = filler.rfind(". ", 0, len(filler) // 2) + 2
        appendices.append(filler[:cut] + f"Note: {what} is {value}. " + filler[cut:])
        questions.append(f"What is {what}?")
        answers.append(value)
    return document, appendices, questions, answers


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--doc-tokens", type=int, default=700)
    parser.add_argument("--appendix-tokens", type=int, default=300)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)

    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    document, appendices, questions, answers = build(args.branches, args.doc_tokens, args.appendix_tokens, args.seed)
    state = document_qa.run(document=document, appendices=appendices, questions=questions)
    print(f"document: ~{args.doc_tokens} tokens shared; {args.branches} branches with ~{args.appendix_tokens}-token appendices")
    rows = []
    for i, (question, answer, report, meta) in enumerate(zip(questions, state["answers"], state["reports"], state["meta"])):
        rows.append({"question": question, "answer": answer, "expected": answers[i], "report": report,
                     "prompt_tokens": meta.get("prompt_tokens"), "cached_tokens": meta.get("cached_tokens")})
        line = (f"branch {i}: {question!r} -> {answer.strip()!r} (expected {answers[i]!r}); "
                f"prompt={meta.get('prompt_tokens')} cached={meta.get('cached_tokens')}")
        if report:
            line += (f"; compressed: shared_prefix={report['shared_prefix_tokens']} private={report['private_tokens']} "
                     f"-> held {report['slots_held'] - report['shared_prefix_tokens']} private slots "
                     f"(freed {report['slots_freed']}), {report['compression_ms']:.0f} ms")
        else:
            line += "; not compressed"
        print(line)
    return {"rows": rows}


if __name__ == "__main__":
    main()
