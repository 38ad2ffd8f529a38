"""Long-context prompts for the demo, tests and benchmarks: real text from a corpus directory
(e.g. ``../shared/data/paul_graham_essays``) or a deterministic synthetic fallback.

Engine-free: never imports SGLang. Token counting uses the model's tokenizer when given one,
else an estimate of 4 characters per token.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

_SYNTHETIC_WORDS = (
    "the grass is green the sky is blue the sun is yellow here we go there and back again "
    "a river runs through the valley while the wind moves over the quiet hills and fields"
).split()


def default_corpus_dir(name: str = "paul_graham_essays") -> Optional[Path]:
    """``../shared/data/<name>`` next to the project checkout (or $LAVA_SGLANG_DATA/<name>), if present."""
    roots = []
    if os.environ.get("LAVA_SGLANG_DATA"):
        roots.append(Path(os.environ["LAVA_SGLANG_DATA"]))
    here = Path(__file__).resolve().parent.parent
    roots += [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for root in roots:
        candidate = root / name
        if candidate.is_dir() and any(candidate.glob("*.txt")):
            return candidate
    return None


def load_corpus(corpus_dir: Optional[os.PathLike | str]) -> Optional[str]:
    """All ``*.txt`` files of a directory, sorted by name and joined; None when there is none."""
    if corpus_dir is None:
        return None
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        return None
    return "\n\n".join(f.read_text(errors="replace").strip() for f in files)


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        sentence = " ".join(rng.choice(_SYNTHETIC_WORDS) for _ in range(rng.randint(8, 16))).capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)


def _count_tokens(tokenizer) -> Callable[[str], int]:
    if tokenizer is None:
        return lambda s: max(1, len(s) // 4)
    return lambda s: len(tokenizer.encode(s, add_special_tokens=False))


def haystack(n_tokens: int, corpus: Optional[str], seed: int, tokenizer=None) -> str:
    """About ``n_tokens`` tokens of text: a random slice of the corpus (whole sentences), or synthetic."""
    count = _count_tokens(tokenizer)
    if not corpus:
        text = synthetic_text(n_tokens * 6, seed)
    else:
        rng = random.Random(seed)
        span = n_tokens * 6
        start = rng.randrange(0, max(1, len(corpus) - span))
        text = corpus[start:start + span]
        dot = text.find(". ")
        if 0 <= dot < 400:
            text = text[dot + 2:]
    # Trim to the token target (binary search over characters).
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


@dataclass
class PasskeyTask:
    prompt: str
    answer: str
    depth: float


def passkey_task(n_tokens: int = 1500, seed: int = 0, depth: Optional[float] = None, corpus: Optional[str] = None,
                 tokenizer=None) -> PasskeyTask:
    """A passkey hidden at ``depth`` (0..1) of about ``n_tokens`` tokens of text; the question comes last."""
    rng = random.Random(seed)
    depth = rng.random() if depth is None else depth
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    header = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    question = "\n\nWhat is the pass key? The pass key is"
    body = haystack(max(16, n_tokens - 60), corpus, seed, tokenizer)
    cut = int(len(body) * depth)
    space = body.rfind(" ", 0, cut)
    cut = space if space > 0 else cut
    return PasskeyTask(prompt=header + body[:cut] + needle + body[cut:] + question, answer=key, depth=depth)
