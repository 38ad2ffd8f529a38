"""Long-generation tasks of the decode-compression study (``--decode-compression``), and their scores.

Compression during decode drops cells while the model writes, so these tasks need an output that
depends on the prompt all the way through (engine-free: a tokenizer and corpus text in, prompts
and token ids out):

* ``copy``     -- a ~400-token passage of essay text (whitespace collapsed to single spaces, so the
                  copy has no line breaks to guess) written out twice, then the passage's first
                  :data:`COPY_PREFIX` tokens: the model writes the third copy. Score
                  (:func:`copy_score`): the share of the passage's remaining tokens reproduced in
                  order (longest common subsequence of token ids over their number). Written twice
                  because the default 135M model copies a passage seen once unreliably even with
                  the full cache (a few prompt forms were tried before the study; this one is the
                  one it copies).
* ``fidelity`` -- a PG-19 slice (:func:`benchmarks.tasks.make_fidelity`) continued for 512 greedy
                  tokens, compared with the full cache's own continuation
                  (:func:`benchmarks.quality_bench.metrics.fidelity`: token match and the first
                  divergence).
* ``loops``    -- a chat request for a long essay on one of :data:`TOPICS`, 512 tokens; score: the
                  distinct-4-gram ratio of the output token ids (:func:`distinct_ngrams`), against the
                  full cache's. Repetition is the known failure of eviction during decode.

``fidelity`` and ``loops`` generate with ``ignore_eos`` (every output is exactly its length);
``copy`` stops at the passage's length or at EOS.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from benchmarks.tasks import make_fidelity
from lava_sglang.workloads import haystack

DECODE_TASKS = ("copy", "fidelity", "loops")
COPY_PREFIX = 16  # passage tokens given as the start of the answer (fewer for passages under 4x this)

TOPICS = (
    "the history of the bicycle", "how bees make honey", "a journey across a desert", "the life of a lighthouse keeper",
    "how bridges are built", "the invention of the printing press", "why the sky is blue", "a day in a busy harbor",
    "the migration of birds", "how bread is baked", "the first voyage around the world", "a small mountain village",
    "how rivers shape valleys", "the history of chess", "a night in a large city", "how a violin is made",
    "the rise of the railways", "life in a coral reef", "how glaciers move", "the history of the postal service",
    "a walk through an old forest", "how paper is made", "the life of a honeybee colony", "the building of a cathedral",
)


@dataclass
class LongSample:
    """One prompt of the study: ``prompt`` (text), ``max_new_tokens``, whether EOS is ignored and,
    for ``copy``, the token ids the output should reproduce (``reference_ids``)."""
    task: str
    seed: int
    prompt: str
    max_new_tokens: int
    ignore_eos: bool
    reference_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"task": self.task, "seed": self.seed, "max_new_tokens": self.max_new_tokens,
                "ignore_eos": self.ignore_eos, "prompt_chars": len(self.prompt),
                "prompt_sha1": hashlib.sha1(self.prompt.encode()).hexdigest()[:16],
                "reference_tokens": len(self.reference_ids)}


def make_copy(seed: int, corpus, tok, copy_tokens: int = 400) -> LongSample:
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    text = re.sub(r"\s+", " ", haystack(copy_tokens + 40, corpus, seed + 500, tok)).strip()
    passage = tok.decode(encode(text)[:copy_tokens]).strip()
    ids = encode(passage)
    prefix = min(COPY_PREFIX, max(1, len(ids) // 4))
    start = tok.decode(ids[:prefix])
    return LongSample("copy", seed, f"{passage}\n\n{passage}\n\n{start}", len(ids) - prefix, False, ids[prefix:])


def make_long_fidelity(seed: int, corpus, tok, prompt_tokens: int, output_tokens: int) -> LongSample:
    s = make_fidelity(prompt_tokens, seed, corpus, tok)
    return LongSample("fidelity", seed, s.prompt, output_tokens, True)


def make_loops(seed: int, tok, output_tokens: int) -> LongSample:
    topic = TOPICS[seed % len(TOPICS)]
    ask = f"Write a long, detailed essay about {topic}."
    prompt = tok.apply_chat_template([{"role": "user", "content": ask}], tokenize=False, add_generation_prompt=True)
    return LongSample("loops", seed, prompt, output_tokens, True)


def make_long_samples(tasks, n: int, tok, corpus, fid_corpus, seed0: int = 0, prompt_tokens: int = 1000,
                      output_tokens: int = 512, copy_tokens: int = 400) -> list[LongSample]:
    """``n`` samples of every task (seeds ``seed0 ...``): the copy passages from ``corpus``, the
    fidelity prompts (``prompt_tokens`` long) from ``fid_corpus``."""
    out = []
    for task in tasks:
        for seed in range(seed0, seed0 + n):
            if task == "copy":
                out.append(make_copy(seed, corpus, tok, copy_tokens))
            elif task == "fidelity":
                out.append(make_long_fidelity(seed, fid_corpus, tok, prompt_tokens, output_tokens))
            elif task == "loops":
                out.append(make_loops(seed, tok, output_tokens))
            else:
                raise ValueError(f"unknown decode task {task!r}; choose from {', '.join(DECODE_TASKS)}")
    return out


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------

def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def copy_score(reference_ids: list[int], output_ids: list[int]) -> float:
    """The share of ``reference_ids`` reproduced in order by ``output_ids`` (LCS / reference length)."""
    return lcs_length(reference_ids, output_ids) / max(1, len(reference_ids))


def distinct_ngrams(ids: list[int], n: int = 4) -> float:
    """Distinct n-grams over all n-grams of ``ids`` (1.0: no n-gram repeats; a loop drives it to 0)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")
