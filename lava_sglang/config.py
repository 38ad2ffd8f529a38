"""Compression settings: each knob declared once, one record, one validator.

Every ``kv_*`` setting is one ``knob(...)`` field of :class:`CompressionConfig`: its name, type,
default, bounds, choices, help and whether a request may set it. The CLI flags
(``server_args_patch.add_cli_args``), the per-request validation (``with_overrides``), the upper
bounds, ``/server_info`` (``to_dict``) and the docs' flag table (``python -m lava_sglang.config``,
checked by ``tests/test_docs.py``) all come from these declarations. Rules between knobs (the
budget counts the window) are in ``CompressionConfig.validate``.

Engine-free: never imports SGLang.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping

# The policies, in one place: "none" (nothing is compressed) and the name of each module of
# lava_sglang/policies that exports ``POLICY`` (``policies.POLICY_CLASSES`` is built from this).
POLICIES = ("none", "streamingllm", "snapkv", "pyramidkv", "adakv", "lava")
POOLINGS = ("max", "avg")
# When a compressed request's prompt is compressed: once after its whole prefill, or after every
# prefill chunk (engine/chunked.py; docs/design.md, "Compression during chunked prefill").
PREFILL_MODES = ("after", "chunked")


@dataclass(frozen=True)
class Knob:
    """One setting's declaration (a ``CompressionConfig`` field's metadata)."""

    kind: type  # int, float, str or bool
    help: str
    low: float | None = None  # inclusive bounds of a number
    high: float | None = None
    choices: tuple = ()
    odd: bool = False
    server_only: bool = False  # sizes the whole server: a request cannot set it
    what: str = "value"  # what a choice is called in an error ("unknown policy 'h2o'")


def knob(default, kind: type, help: str, **rules) -> Any:
    return dataclasses.field(default=default, metadata={"knob": Knob(kind, help, **rules)})


class ConfigError(ValueError):
    """A compression setting is invalid. The message names the setting and the rule."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class CompressionConfig:
    """What to compress and how much.

    ``budget`` counts kept tokens per (layer, KV head) on average, *window included*, as the
    LAVa/AdaKV/SnapKV papers' ``max_capacity_prompt`` does: ``budget=128, window=32`` keeps
    96 scored tokens per head per layer on average, plus the 32 window tokens.
    """

    # Upper bounds keep one request's cost proportional to its prompt: scoring costs window x
    # prompt per head, pooling kernel x prompt; a budget or a minimum prompt length past any
    # context length is meaningless.
    policy: str = knob("none", str, "KV-cache eviction policy; 'none' leaves SGLang's behaviour alone.",
                       choices=POLICIES, what="policy")
    budget: int = knob(128, int, "Average kept tokens per KV head per layer, observation window included (the "
                       "papers' max_capacity_prompt); must be larger than the window.", low=0, high=1 << 20)
    window: int = knob(32, int, "Observation window: the last prompt tokens, whose queries score the cache; "
                       "always kept.", low=1, high=1024)
    pooling: str = knob("max", str, "Pooling of the scores along the sequence.", choices=POOLINGS, what="pooling")
    kernel_size: int = knob(7, int, "Pooling kernel size (odd).", low=1, high=127, odd=True)
    floor_alpha: float = knob(0.2, float, "Share of each head's budget guaranteed before the cross-head top-k "
                              "(adakv, lava).", low=0.0, high=1.0)
    pyramid_beta: float = knob(20.0, float, "PyramidKV slope: the last layer keeps budget/beta.", low=1.0, high=1000.0)
    min_prompt_len: int = knob(0, int, "Prompts shorter than this are never compressed.", low=0, high=1 << 20)
    prefill_compression: str = knob(
        "after", str, "after: compress once the whole prompt is prefilled; chunked: re-select after every prefill "
        "chunk (--chunked-prefill-size), so a request holds at most budget + chunk + window + 1 slots while it is "
        "prefilled and prompts longer than the pool can be served.", choices=PREFILL_MODES, what="mode")
    prefill_working_budget: int = knob(
        0, int, "Under chunked prefill compression: what the selections made before the prompt is complete keep "
        "(0: the budget). The last one, scored by the prompt's own window, keeps the budget; a larger working budget "
        "leaves it more of the early text to choose from, at a higher peak (working budget + chunk + window + 1).",
        low=0, high=1 << 20)
    park: bool = knob(True, bool, "Park a compressed request's state when it finishes, so a request that resends its "
                      "whole history continues over it and prefills only its new tokens (engine/parking.py).")
    park_max_slots: int = knob(0, int, "Most KV slots parked conversations hold together (0: no cap but the pool; "
                               "parked memory is evictable and goes first, least recently used).",
                               low=0, high=1 << 40, server_only=True)
    park_max_conversations: int = knob(0, int, "Most parked conversations at once (0: half the request rows, "
                                       "--max-running-requests); each holds a row, taken back least recently used "
                                       "whenever a request needs one.", low=0, high=1 << 24, server_only=True)

    # Compression during decode (engine/decode_compression.py): the generated tokens are the
    # history's newest chunk.
    decode_budget: int = knob(0, int, "Compress while generating (0: off): every time a request's private history has "
                              "grown --kv-decode-interval tokens past this many per KV head per layer, it is re-selected "
                              "to this many, so it holds at most max(budget, decode budget) + interval + 1 private slots "
                              "however long it generates.", low=0, high=1 << 20)
    decode_interval: int = knob(128, int, "Tokens generated between two selections during decode; at least the window.",
                                low=1, high=1 << 20)

    # Public names of the fields: CLI flag ``--kv-<name>`` and request key ``kv_<name>``.
    @staticmethod
    def flag(field: str) -> str:
        return "--kv-" + field.replace("_", "-")

    @staticmethod
    def key(field: str) -> str:
        return "kv_" + field

    @staticmethod
    def knobs() -> dict[str, Knob]:
        """Each setting's declaration, by field name, in declaration order."""
        return {f.name: f.metadata["knob"] for f in dataclasses.fields(CompressionConfig)}

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    @property
    def working_budget(self) -> int:
        """What a chunked request's selections before its prompt is complete keep."""
        return max(self.budget, self.prefill_working_budget)

    @property
    def scored_budget(self) -> int:
        """Per-(layer, KV head) budget excluding the observation window (``b`` in the papers)."""
        return self.budget - self.window

    def validate(self, name=None) -> "CompressionConfig":
        """Raise ConfigError naming the offending setting; return self when valid.

        ``name`` maps a field to the name shown in messages (default: the CLI flag).
        """
        name = name or self.flag
        for field, spec in self.knobs().items():
            check(spec, getattr(self, field), name(field))
        if self.budget <= self.window:
            raise ConfigError(
                name("budget"),
                f"must be larger than the window ({name('window')} = {self.window}) because the budget "
                f"counts the window; got {self.budget}",
            )
        if self.prefill_working_budget and self.prefill_working_budget < self.budget:
            raise ConfigError(name("prefill_working_budget"), f"must be 0 (the budget) or at least the budget "
                              f"({name('budget')} = {self.budget}); got {self.prefill_working_budget}")
        if self.decode_budget and self.decode_budget <= self.window:
            raise ConfigError(name("decode_budget"), f"must be 0 (off) or larger than the window ({name('window')} = "
                              f"{self.window}); got {self.decode_budget}")
        if self.decode_budget and self.decode_interval < self.window:
            raise ConfigError(name("decode_interval"), f"must be at least the window ({name('window')} = {self.window}): "
                              f"a selection is scored by the last window generated tokens; got {self.decode_interval}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {self.key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def with_overrides(self, overrides: Mapping[str, Any]) -> "CompressionConfig":
        """Apply per-request overrides keyed ``kv_<field>``; unknown keys and bad values raise ConfigError."""
        knobs = self.knobs()
        settable = sorted(self.key(f) for f, spec in knobs.items() if not spec.server_only)
        changes = {}
        for key, value in overrides.items():
            field = key[3:] if isinstance(key, str) and key.startswith("kv_") else None
            if field not in knobs:
                raise ConfigError(str(key), f"unknown compression setting; known: {', '.join(settable)}")
            if knobs[field].server_only:
                raise ConfigError(key, f"is a server-wide setting ({self.flag(field)}); a request cannot change it")
            if knobs[field].kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            changes[field] = value
        return dataclasses.replace(self, **changes).validate(name=self.key)


def check(spec: Knob, value, name: str) -> None:
    """One value against its declaration; ConfigError naming ``name`` when it breaks a rule."""
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return
    if spec.choices:
        if value not in spec.choices or not isinstance(value, str):
            raise ConfigError(name, f"unknown {spec.what} {value!r}; choose one of {', '.join(spec.choices)}")
        return
    if spec.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(name, f"must be finite, got {value!r}")
    if spec.kind is float and spec.low is not None and spec.high is not None and not spec.low <= value <= spec.high:
        raise ConfigError(name, f"must be within [{spec.low:g}, {spec.high:g}], got {value}")
    if spec.low is not None and spec.low >= 0 and value < 0:
        raise ConfigError(name, f"must not be negative, got {value}")
    if spec.odd and value % 2 == 0:
        raise ConfigError(name, f"must be an odd positive integer (same-length pooling), got {value}")
    if spec.low is not None and value < spec.low:
        raise ConfigError(name, f"must be at least {spec.low}, got {value}")
    if spec.high is not None and value > spec.high:
        raise ConfigError(name, f"must be at most {spec.high}, got {value}")


# Derived views, for the code that reads them.
UPPER_BOUNDS = {f: spec.high for f, spec in CompressionConfig.knobs().items() if spec.high is not None}
SERVER_ONLY = tuple(f for f, spec in CompressionConfig.knobs().items() if spec.server_only)


def _default_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`" if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def flag_table() -> str:
    """The docs' flag table (docs/usage.md, between its ``flags`` markers), from the declarations."""
    defaults = CompressionConfig()
    rows = ["| flag | request key | default | meaning |", "|---|---|---|---|"]
    for field, spec in CompressionConfig.knobs().items():
        flag = CompressionConfig.flag(field)
        if spec.kind is bool:
            shown = f"`{flag}` / `--no-{flag[2:]}`"
        elif spec.choices:
            shown = f"`{flag} {{{','.join(spec.choices)}}}`"
        else:
            shown = f"`{flag} {'N' if spec.kind is int else 'F'}`"
        key = "server only" if spec.server_only else f"`{CompressionConfig.key(field)}`"
        rows.append(f"| {shown} | {key} | {_default_text(getattr(defaults, field))} | {spec.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(flag_table())
