"""Compression settings inside SGLang: the server's, each request's (resolved once and cached on
the request), and the checks a request passes before it reaches the scheduler.

Per-request settings are ``sampling_params.custom_params`` keys ``kv_*``. They are validated where
SGLang validates sampling parameters (``SamplingParams.verify``, in the tokenizer process), so a
bad value is an HTTP 400 naming the field and never reaches the scheduler; the scheduler resolves
the same overrides once per request (``request_config``).

The tokenizer process also refuses, for every policy (``none`` included), the inputs that would
take the scheduler down instead of failing one request: an empty prompt and token ids outside
the vocabulary (``TokenizerManager._validate_one_request``); and, with compression on, beam
search (``beam_width > 1``: beam members copy a request's row, which a compressed row cannot be
read as). No SGLang import at module level.
"""

from __future__ import annotations

import logging
import sys

from lava_sglang.config import CompressionConfig
from lava_sglang.policies.base import needs_compression
from lava_sglang.server_args_patch import config_of

logger = logging.getLogger("lava_sglang")

SAMPLING_PARAMS = "sglang.srt.sampling.sampling_params.SamplingParams"
TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"

_SERVER: dict = {"config": None}
_ATTR = "_lava_kv_config"  # the resolved config, cached on SGLang's Req
# Settings that size the server, not a conversation: a borrower of a parked one need not match them.
_SERVER_SETTINGS = ("park", "park_max_slots", "park_max_conversations")


def set_server_config(config: CompressionConfig) -> None:
    _SERVER["config"] = config


def server_config() -> CompressionConfig:
    """The server-wide config of this process (set when the scheduler starts)."""
    if _SERVER["config"] is None:
        _SERVER["config"] = config_of(None)
    return _SERVER["config"]


def kv_overrides(custom_params) -> dict:
    if not isinstance(custom_params, dict):
        return {}
    return {k: v for k, v in custom_params.items() if isinstance(k, str) and k.startswith("kv_")}


def resolve(base: CompressionConfig, custom_params) -> CompressionConfig:
    """``base`` with the request's overrides; raises ConfigError (a ValueError) naming the field.

    On a ``--kv-policy none`` server a request cannot turn compression on; one that says
    ``"kv_policy": "none"`` is served as without the plugin, whatever else it sets."""
    overrides = kv_overrides(custom_params)
    if not overrides:
        return base
    if not base.enabled and overrides.get("kv_policy") != "none":
        raise ValueError(
            f"{', '.join(sorted(overrides))}: KV compression is off on this server (--kv-policy none); "
            "start it with a policy to choose compression per request"
        )
    return base.with_overrides(overrides)


def request_config(req) -> CompressionConfig:
    """Server config with the request's ``kv_*`` overrides, resolved once and cached on ``req``."""
    cached = getattr(req, _ATTR, None)
    if cached is not None:
        return cached
    custom = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    try:
        config = resolve(server_config(), custom)
    except ValueError as exc:  # rejected with HTTP 400 before it gets here; never crash the scheduler
        logger.warning("lava-sglang: request %s: ignoring invalid compression settings (%s)",
                       getattr(req, "rid", "?"), exc)
        config = server_config()
    try:
        setattr(req, _ATTR, config)
    except AttributeError:
        pass
    return config


def set_request_config(req, config: CompressionConfig) -> None:
    """Replace the settings cached on ``req`` (a retracted request compressed during decode is
    prefilled again chunk by chunk: ``long_prompts.rechunk_after_retraction``)."""
    setattr(req, _ATTR, config)


def should_compress(config: CompressionConfig, prefix_len: int, seq_len: int) -> bool:
    """The one "compress or not" rule (first compression, re-selection of a continued turn, and
    the policies' own selection): ``policies.base.needs_compression``."""
    return needs_compression(config, prefix_len, seq_len)


# How a turn's own prompt is prefilled, or its output compressed, does not change what a
# conversation holds.
_PREFILL_ONLY = ("prefill_compression", "decode_budget", "decode_interval")


def conversation_settings(config: CompressionConfig) -> tuple:
    """What a request must share with a parked conversation to continue it."""
    return tuple(sorted((k, v) for k, v in config.to_dict().items()
                        if k[3:] not in _SERVER_SETTINGS and k[3:] not in _PREFILL_ONLY))


def refuse_to_start(message: str) -> None:
    """One error line on stderr and in the log, exit status 1 (a setting we cannot support)."""
    logger.error(message)
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(1)


# --------------------------------------------------------------------------------------------
# tokenizer-side checks (HTTP 400)
# --------------------------------------------------------------------------------------------

def check_custom_params(custom_params) -> None:
    """``custom_params`` must be a JSON object (or absent): a string such as ``"kv_budget=64"``
    would otherwise be ignored silently and the request served with the server's settings."""
    if custom_params is not None and not isinstance(custom_params, dict):
        raise ValueError(f"custom_params: must be a JSON object such as {{\"kv_budget\": 64}}, got "
                         f"{type(custom_params).__name__} {str(custom_params)[:40]!r}")


def after_sampling_params_verify(result, self, *args, **kwargs):
    server = config_of(None)
    if server.enabled:
        check_custom_params(getattr(self, "custom_params", None))
    config = resolve(server, getattr(self, "custom_params", None))
    beam = getattr(self, "beam_width", None)
    if config.enabled and isinstance(beam, int) and beam > 1:
        raise ValueError(f"beam_width: beam search (beam_width {beam}) cannot run with KV compression "
                         f"(kv_policy {config.policy}); its beams copy the request's cache rows")
    return result


def check_input_ids(input_ids, vocab_size: int, session: bool = False) -> None:
    """Raise ValueError when the prompt is empty or holds an id outside ``[0, vocab_size)``."""
    if input_ids is None:
        return  # input_embeds: nothing to check here
    if len(input_ids) == 0 and not session:
        raise ValueError("the prompt is empty: a request needs at least one input token")
    if not vocab_size or not len(input_ids):
        return
    bad = next((t for t in input_ids if not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= vocab_size),
               None)
    if bad is not None:
        raise ValueError(f"input_ids: token id {bad!r} is outside the vocabulary; valid ids are [0, {vocab_size})")


def before_validate_one_request(self, obj, input_ids, *args, **kwargs):
    """``TokenizerManager._validate_one_request``: an HTTP 400 for an empty prompt or an id the
    model's embedding cannot look up (stock SGLang raises inside the scheduler's forward)."""
    vocab = getattr(getattr(self, "model_config", None), "vocab_size", 0)
    check_input_ids(input_ids, int(vocab or 0), session=bool(getattr(obj, "session_params", None)))
    return None


HOOKS = [
    (f"{SAMPLING_PARAMS}.verify", after_sampling_params_verify, "AFTER", False),
    (f"{TOKENIZER_MANAGER}._validate_one_request", before_validate_one_request, "BEFORE", False),
]
