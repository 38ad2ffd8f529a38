"""The ``--kv-*`` command-line flags: added to SGLang's parser, validated, carried to the scheduler.

``ServerArgs`` is a sealed msgspec record, so a plugin cannot add fields. The flags are added by
an AFTER hook on ``ServerArgs.add_cli_args``; an AFTER hook on ``ServerArgs.from_cli_args``
validates them (exit status 2 with a message naming the flag, as argparse does), stores the
config as the bookkeeping attribute ``_lava_kv_config`` (``ServerArgs.__reduce__`` carries
``__dict__`` to the scheduler process) and in the environment variable ``LAVA_SGLANG_KV_CONFIG``
(inherited by spawned processes, and the way to configure ``sglang.Engine(...)`` in Python: an
BEFORE hook on ``ServerArgs.resolve_once`` reads it for a ServerArgs built without the CLI), and
switches off the SGLang features compression cannot run with yet but the user did not ask for
explicitly (decode and prefill CUDA graphs, mixed chunk), logging that it did.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from lava_sglang.config import CompressionConfig, ConfigError

logger = logging.getLogger("lava_sglang")

ENV_VAR = "LAVA_SGLANG_KV_CONFIG"
ATTR = "_lava_kv_config"

_DEFAULTS = CompressionConfig()


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """One ``--kv-*`` flag per declared knob (``config.CompressionConfig``); values are checked by
    ``CompressionConfig.validate`` in ``after_from_cli_args`` (exit status 2 naming the flag)."""
    group = parser.add_argument_group("KV-cache compression (lava-sglang plugin)")
    for field, spec in CompressionConfig.knobs().items():
        extra = {"help": spec.help + ("" if spec.server_only else f" Per request: {CompressionConfig.key(field)}."),
                 "default": getattr(_DEFAULTS, field)}
        if spec.kind is bool:
            extra["action"] = argparse.BooleanOptionalAction
        elif spec.choices:
            extra["choices"] = spec.choices
        else:
            extra["type"] = spec.kind
        group.add_argument(CompressionConfig.flag(field), **extra)


def config_from_namespace(args: argparse.Namespace) -> CompressionConfig:
    values = {}
    for field in dataclasses.fields(CompressionConfig):
        dest = "kv_" + field.name
        if hasattr(args, dest):
            values[field.name] = getattr(args, dest)
    return CompressionConfig(**values).validate()


def config_of(server_args) -> CompressionConfig:
    """The compression config of a server: from the record, else the environment, else the default."""
    stored = getattr(server_args, ATTR, None) if server_args is not None else None
    if stored is None:
        stored = os.environ.get(ENV_VAR)
    if not stored:
        return CompressionConfig()
    return CompressionConfig(**json.loads(stored)).validate()


_ON: dict = {}


def compression_on() -> bool:
    """Whether this process's server compresses (a policy other than ``none``), memoised on the
    stored config: cheap enough to ask on every call of a gated hook (``plugin.gated``)."""
    stored = os.environ.get(ENV_VAR)
    on = _ON.get(stored)
    if on is None:
        on = _ON[stored] = bool(stored) and config_of(None).enabled
    return on


def after_add_cli_args(result, parser, *args, **kwargs):
    add_cli_args(parser)
    return result


def after_from_cli_args(server_args, cls, args, *rest, **kwargs):
    try:
        config = config_from_namespace(args)
    except ConfigError as exc:
        # Same contract as argparse: usage error, exit status 2, message names the flag.
        print(f"sglang serve: error: argument {exc}", file=sys.stderr)
        sys.exit(2)
    encoded = json.dumps(dataclasses.asdict(config))
    setattr(server_args, ATTR, encoded)
    os.environ[ENV_VAR] = encoded
    if config.enabled:
        adjust_server_args(server_args, config)
    return server_args


def before_resolve_once(server_args, *args, **kwargs):
    """``ServerArgs.resolve_once`` (every launcher calls it before it starts anything): a
    ServerArgs built without the CLI (offline ``sglang.Engine(...)``,
    ``lava_sglang.offline.Engine``) takes its compression settings from ``LAVA_SGLANG_KV_CONFIG``
    and gets the same adjustments as the CLI's (``after_from_cli_args`` made them already for a
    CLI one). ``__post_init__`` cannot be hooked: msgspec calls the one the class was built with."""
    if getattr(server_args, ATTR, None) is not None or getattr(server_args, "_resolution_finished", False) \
            or not os.environ.get(ENV_VAR):
        return None
    config = config_of(None)
    setattr(server_args, ATTR, json.dumps(dataclasses.asdict(config)))
    if config.enabled:
        adjust_server_args(server_args, config)
    return None


def adjust_server_args(server_args, config: CompressionConfig) -> None:
    """Turn off what compression cannot run with yet, where the user did not ask for it explicitly.

    CUDA graphs: on replay only the captured kernels run, not the Python ``RadixAttention.forward``
    the plugin wraps, so a graph would silently bypass compression. SGLang 0.5.23 captures decode
    graphs by default and, on CUDA, a breakable prefill graph (``default_prefill_backend``).
    Settings the user did ask for (``--cuda-graph-backend-decode``/``-prefill``, a
    ``--cuda-graph-config`` JSON, tensor parallelism, ...) are refused at scheduler start by
    ``lava_sglang.engine.startup_checks``.
    """
    if getattr(server_args, "cuda_graph_backend_decode", None) is None and not getattr(server_args, "disable_decode_cuda_graph", False):
        server_args.disable_decode_cuda_graph = True
        logger.info("lava-sglang: --kv-policy %s: decode CUDA graphs disabled (decode over compressed caches runs eagerly)",
                    config.policy)
    if getattr(server_args, "cuda_graph_backend_prefill", None) is None and not getattr(server_args, "disable_prefill_cuda_graph", False):
        server_args.disable_prefill_cuda_graph = True
        logger.info("lava-sglang: --kv-policy %s: prefill CUDA graph disabled (prefill runs eagerly, so the plugin "
                    "sees every layer's attention)", config.policy)
    if getattr(server_args, "enable_mixed_chunk", False):
        server_args.enable_mixed_chunk = False
        logger.warning("lava-sglang: --kv-policy %s: --enable-mixed-chunk turned off (not supported with compression)", config.policy)
