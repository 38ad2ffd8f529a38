"""Quality-benchmark tasks, generated deterministically from a seed and sized in tokens.

Engine-free (never imports SGLang). Every task returns :class:`Sample` records whose prompt is
``context + question``: the *context* is the long text that gets compressed, the *question*
asks for something hidden in it and ends with the start of the answer (the default model is a
135M-parameter model: completion-style prompts work far better than chat prompts).

Tasks (RULER-style, https://arxiv.org/abs/2404.06654, sized for a small model):

* ``passkey``          -- :func:`lava_sglang.workloads.passkey_task` (5-digit key, question last)
* ``niah_single``      -- one "special magic number" (7 digits) for a keyword, hidden in essays
* ``niah_multikey``    -- four needles with different keywords; asks for one of them
* ``niah_multivalue``  -- four numbers for the same keyword; asks for all (score: recall)
* ``vt``               -- variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ...
                          spread through the text; asks for every variable holding the value
                          (score: recall of the chain's names)
* ``cwe``              -- common-words extraction: a numbered word list where 10 words repeat
                          many times; asks for the 10 most common (score: recall)
* ``fidelity``         -- real long text (pg19 books); no answer: the benchmark compares 32
                          greedy tokens and the next-token distributions with the uncompressed
                          server's continuation

Haystacks come from a corpus text (``../shared/data/paul_graham_essays`` for the needle tasks,
``../shared/data/pg19`` for fidelity) or the synthetic fallback of
:func:`lava_sglang.workloads.haystack`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from lava_sglang.workloads import haystack, passkey_task

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "fidelity")

# Keywords for needles and words for the common-words task: plain, distinct English words.
WORDS = (
    "apple anchor badge basket beacon blanket bottle bridge button candle canyon carpet castle "
    "cellar cheese circle cliff clock cloud coffee copper cotton crystal curtain desert diamond "
    "dolphin dragon drawer eagle engine falcon feather fiddle forest fountain garden garlic ginger "
    "glacier hammer harbor helmet hollow island jacket jungle kettle ladder lantern lemon lizard "
    "magnet maple marble meadow mirror monkey mountain needle nickel oyster paddle palace pepper "
    "pencil pillow planet pocket pony puzzle rabbit radio ribbon river rocket saddle salmon "
    "shadow silver spider spoon statue stove summer tablet teapot thunder ticket tiger tomato "
    "tower trumpet tunnel turtle umbrella valley velvet violin wagon walnut window winter wizard "
    "yellow zebra orchid parrot quilt raven sapphire tractor walrus"
).split()


@dataclass
class Sample:
    task: str
    seed: int
    n_tokens: int
    context: str
    question: str
    answers: list[str] = field(default_factory=list)
    max_new_tokens: int = 16
    metric: str = "all"  # "all": every answer must appear; "recall": fraction that appears; "fidelity"

    @property
    def prompt(self) -> str:
        return self.context + self.question

    def to_dict(self) -> dict:
        return {"task": self.task, "seed": self.seed, "n_tokens": self.n_tokens, "answers": self.answers,
                "max_new_tokens": self.max_new_tokens, "metric": self.metric,
                "context_chars": len(self.context), "question": self.question}


def score(sample: Sample, output: str) -> float:
    """1.0 / 0.0 for single-answer tasks, the fraction of answers found for the recall tasks.

    An answer counts when it appears as a whole word (numbers: not part of a longer number)."""
    if not sample.answers:
        return float("nan")
    found = [re.search(r"(?<![0-9A-Za-z])" + re.escape(a) + r"(?![0-9A-Za-z])", output, re.IGNORECASE) is not None
             for a in sample.answers]
    if sample.metric == "recall":
        return sum(found) / len(found)
    return float(all(found))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _count(tokenizer) -> Callable[[str], int]:
    if tokenizer is None:
        return lambda s: max(1, len(s) // 4)
    return lambda s: len(tokenizer.encode(s, add_special_tokens=False))


def _insert(body: str, inserts: list[tuple[float, str]]) -> str:
    """Insert each text at its relative depth of ``body``, at a sentence boundary (or space)."""
    cuts = []
    for depth, text in inserts:
        pos = int(len(body) * depth)
        dot = body.rfind(". ", 0, pos)
        if dot >= 0 and pos - dot < 300:
            pos = dot + 1
        else:
            space = body.rfind(" ", 0, pos)
            pos = space if space > 0 else pos
        cuts.append((pos, text))
    out, last = [], 0
    for pos, text in sorted(cuts, key=lambda c: c[0]):
        out.append(body[last:pos])
        out.append(" " + text)
        last = pos
    out.append(body[last:])
    return "".join(out)


def _body(n_tokens: int, fixed: str, corpus: Optional[str], seed: int, tokenizer) -> str:
    """Haystack text so that haystack + ``fixed`` (header, needles, question) is about ``n_tokens``."""
    count = _count(tokenizer)
    return haystack(max(16, n_tokens - count(fixed)), corpus, seed, tokenizer)


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


NIAH_HEADER = ("Some special magic numbers are hidden within the following text. "
               "Make sure to memorize them. I will quiz you about the numbers afterwards.\n\n")


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


# ----------------------------------------------------------------------------------------------
# generators
# ----------------------------------------------------------------------------------------------

def make_passkey(n_tokens, seed, corpus=None, tokenizer=None) -> Sample:
    t = passkey_task(n_tokens, seed=seed, corpus=corpus, tokenizer=tokenizer)
    marker = "\n\nWhat is the pass key?"
    cut = t.prompt.rindex(marker)
    return Sample("passkey", seed, n_tokens, t.prompt[:cut], t.prompt[cut:], [t.answer], max_new_tokens=8)


def _niah(task, n_tokens, seed, corpus, tokenizer, n_keys: int, n_values: int) -> Sample:
    rng = random.Random(f"{task}:{seed}")
    keys = rng.sample(WORDS, n_keys)
    values = [[_number(rng) for _ in range(n_values)] for _ in keys]
    needles = [_needle(k, v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    target = 0
    if n_values == 1:
        question = (f"\n\nWhat is the special magic number for {keys[target]} mentioned in the provided text? "
                    f"The special magic number for {keys[target]} mentioned in the provided text is")
        max_new, metric = 12, "all"
    else:
        question = (f"\n\nWhat are all the special magic numbers for {keys[target]} mentioned in the provided text? "
                    f"The special magic numbers for {keys[target]} mentioned in the provided text are")
        max_new, metric = 12 * n_values, "recall"
    body = _body(n_tokens, NIAH_HEADER + " ".join(needles) + question, corpus, seed, tokenizer)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    context = NIAH_HEADER + _insert(body, list(zip(depths, needles)))
    return Sample(task, seed, n_tokens, context, question, values[target], max_new_tokens=max_new, metric=metric)


def make_niah_single(n_tokens, seed, corpus=None, tokenizer=None) -> Sample:
    return _niah("niah_single", n_tokens, seed, corpus, tokenizer, n_keys=1, n_values=1)


def make_niah_multikey(n_tokens, seed, corpus=None, tokenizer=None) -> Sample:
    return _niah("niah_multikey", n_tokens, seed, corpus, tokenizer, n_keys=4, n_values=1)


def make_niah_multivalue(n_tokens, seed, corpus=None, tokenizer=None) -> Sample:
    return _niah("niah_multivalue", n_tokens, seed, corpus, tokenizer, n_keys=1, n_values=4)


def make_vt(n_tokens, seed, corpus=None, tokenizer=None, hops: int = 4) -> Sample:
    rng = random.Random(f"vt:{seed}")
    names = set()
    while len(names) < hops + 1:
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    # sorted first: a set's order depends on the process's string hash seed
    names = sorted(sorted(names), key=lambda _: rng.random())
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    header = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
                f"are assigned the value {value}, they are:")
    body = _body(n_tokens, header + " ".join(chain) + question, corpus, seed, tokenizer)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in chain)  # chain order preserved in the text
    context = header + _insert(body, list(zip(depths, chain)))
    return Sample("vt", seed, n_tokens, context, question, names, max_new_tokens=8 * (hops + 1), metric="recall")


def make_cwe(n_tokens, seed, corpus=None, tokenizer=None, n_common: int = 10, freq_common: int = 6,
             freq_rare: int = 1) -> Sample:
    """RULER's common-words extraction: the haystack is the word list itself (``corpus`` unused)."""
    rng = random.Random(f"cwe:{seed}")
    count = _count(tokenizer)
    words = WORDS[:]
    rng.shuffle(words)
    common, rare = words[:n_common], words[n_common:]
    header = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
    question = (f"\nQuestion: What are the {n_common} most common words in the above list? "
                f"Answer: The top {n_common} words that appear most often in the list are:")

    def build(n_rare_kinds: int) -> str:
        items = common * freq_common + [rare[i % len(rare)] for i in range(n_rare_kinds)] * freq_rare
        local = random.Random(f"cwe-order:{seed}")
        local.shuffle(items)
        return header + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(items))

    lo, hi = 0, 4000  # number of rare items: grow the list until it reaches the token target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(build(mid) + question) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    # the rare words cycle through the word list: keep every one of them rarer than the common ones
    assert freq_rare * -(-lo // len(rare)) < freq_common, "cwe: prompt too long for the word list; raise freq_common"
    return Sample("cwe", seed, n_tokens, build(lo), question, common, max_new_tokens=40, metric="recall")


def make_fidelity(n_tokens, seed, corpus=None, tokenizer=None) -> Sample:
    """A slice of real long text; the benchmark continues it for 32 greedy tokens."""
    text = haystack(n_tokens, corpus, seed + 1000, tokenizer)
    # End on a sentence boundary-ish so the continuation is natural.
    return Sample("fidelity", seed, n_tokens, text, "", [], max_new_tokens=32, metric="fidelity")


GENERATORS: dict[str, Callable[..., Sample]] = {
    "passkey": make_passkey,
    "niah_single": make_niah_single,
    "niah_multikey": make_niah_multikey,
    "niah_multivalue": make_niah_multivalue,
    "vt": make_vt,
    "cwe": make_cwe,
    "fidelity": make_fidelity,
}


def make_samples(task: str, n_tokens: int, n_samples: int, corpus: Optional[str], tokenizer=None,
                 seed0: int = 0) -> list[Sample]:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return [GENERATORS[task](n_tokens, seed0 + i, corpus=corpus, tokenizer=tokenizer) for i in range(n_samples)]
