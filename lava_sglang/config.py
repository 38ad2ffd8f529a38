"""Compression settings: one record, one validator, shared by the CLI flags and per-request overrides.

Engine-free: never imports SGLang.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

POLICIES = ("none", "streamingllm", "snapkv", "pyramidkv", "adakv", "lava")
POOLINGS = ("max", "avg")
# When a compressed request's prompt is compressed: once after its whole prefill, or after every
# prefill chunk (engine/chunked.py; docs/design.md, "Compression during chunked prefill").
PREFILL_MODES = ("after", "chunked")

# Upper bounds of the numeric settings, so that one request's cost stays proportional to its
# prompt: scoring costs window x prompt per head, pooling kernel x prompt; a budget or a
# minimum prompt length past any context length is meaningless.
UPPER_BOUNDS = {
    "window": 1024,
    "kernel_size": 127,
    "budget": 1 << 20,
    "min_prompt_len": 1 << 20,
    "pyramid_beta": 1000.0,
    "park_max_slots": 1 << 40,
    "park_max_conversations": 1 << 24,
}


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

    policy: str = "none"
    budget: int = 128
    window: int = 32
    pooling: str = "max"
    kernel_size: int = 7
    floor_alpha: float = 0.2
    pyramid_beta: float = 20.0
    min_prompt_len: int = 0
    # "after": compress once the whole prompt is prefilled; "chunked": re-select after every
    # prefill chunk, so a request holds at most budget + chunk + window slots while prefilled.
    prefill_compression: str = "after"
    # Parked conversations (engine.parking): a compressed request's state outlives it, for a
    # client that resends the whole history; ``park_max_slots`` caps what they hold (0: no cap
    # but the pool, they are evicted on demand). ``park_max_slots`` is server-wide only.
    park: bool = True
    park_max_slots: int = 0
    # Most parked conversations at once (0: derived from the request rows, ``engine.parking``);
    # server-wide only.
    park_max_conversations: int = 0

    # Public names of the fields: CLI flag ``--kv-<name>`` and request key ``kv_<name>``.
    @staticmethod
    def flag(field: str) -> str:
        return "--kv-" + field.replace("_", "-")

    @staticmethod
    def key(field: str) -> str:
        return "kv_" + field

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    @property
    def scored_budget(self) -> int:
        """Per-(layer, KV head) budget excluding the observation window (``b`` in the papers)."""
        return self.budget - self.window

    def validate(self, name=None) -> "CompressionConfig":
        """Raise ConfigError naming the offending setting; return self when valid.

        ``name`` maps a field to the name shown in messages (default: the CLI flag).
        """
        name = name or self.flag
        if self.policy not in POLICIES:
            raise ConfigError(name("policy"), f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.pooling not in POOLINGS:
            raise ConfigError(name("pooling"), f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.prefill_compression not in PREFILL_MODES:
            raise ConfigError(name("prefill_compression"),
                              f"unknown mode {self.prefill_compression!r}; choose one of {', '.join(PREFILL_MODES)}")
        if not isinstance(self.park, bool):
            raise ConfigError(name("park"), f"must be true or false, got {self.park!r}")
        for field in ("budget", "window", "kernel_size", "min_prompt_len", "park_max_slots", "park_max_conversations"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(name(field), f"must be an integer, got {value!r}")
            if value < 0:
                raise ConfigError(name(field), f"must not be negative, got {value}")
            if field in UPPER_BOUNDS and value > UPPER_BOUNDS[field]:
                raise ConfigError(name(field), f"must be at most {UPPER_BOUNDS[field]}, got {value}")
        for field in ("floor_alpha", "pyramid_beta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(name(field), f"must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise ConfigError(name(field), f"must be finite, got {value!r}")
        if float(self.pyramid_beta) > UPPER_BOUNDS["pyramid_beta"]:
            raise ConfigError(name("pyramid_beta"), f"must be at most {UPPER_BOUNDS['pyramid_beta']}, got {self.pyramid_beta}")
        if self.window < 1:
            raise ConfigError(name("window"), f"must be at least 1, got {self.window}")
        if self.budget <= self.window:
            raise ConfigError(
                name("budget"),
                f"must be larger than the window ({name('window')} = {self.window}) because the budget "
                f"counts the window; got {self.budget}",
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(name("kernel_size"), f"must be an odd positive integer (same-length pooling), got {self.kernel_size}")
        if not 0.0 <= float(self.floor_alpha) <= 1.0:
            raise ConfigError(name("floor_alpha"), f"must be within [0, 1], got {self.floor_alpha}")
        if not float(self.pyramid_beta) >= 1.0:
            raise ConfigError(name("pyramid_beta"), f"must be at least 1, got {self.pyramid_beta}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {self.key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    # Settings a request cannot override (they size what the whole server holds).
    SERVER_ONLY = ("park_max_slots", "park_max_conversations")

    def with_overrides(self, overrides: Mapping[str, Any]) -> "CompressionConfig":
        """Apply per-request overrides keyed ``kv_<field>``; unknown keys and bad values raise ConfigError."""
        fields = {self.key(f.name): f.name for f in dataclasses.fields(self) if f.name not in self.SERVER_ONLY}
        changes = {}
        for key, value in overrides.items():
            if key in (self.key(f) for f in self.SERVER_ONLY):
                raise ConfigError(str(key), f"is a server-wide setting ({self.flag(key[3:])}); a request cannot change it")
            if key not in fields:
                raise ConfigError(str(key), f"unknown compression setting; known: {', '.join(sorted(fields))}")
            field = fields[key]
            if field in ("floor_alpha", "pyramid_beta") and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            changes[field] = value
        return dataclasses.replace(self, **changes).validate(name=self.key)
