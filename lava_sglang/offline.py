"""Offline ``sglang.Engine`` with KV compression (the frontend language's offline runtime, batch
and RL pipelines): ``lava_sglang.offline.Engine(kv_policy="lava", kv_budget=128, **engine_kwargs)``.

``sglang.Engine(**kwargs)`` builds its ``ServerArgs`` from keyword arguments, which are sealed:
it cannot take ``kv_*`` settings. This wrapper takes them out, validates them (a ``ConfigError``
naming the setting), puts them in ``LAVA_SGLANG_KV_CONFIG`` (inherited by the scheduler
processes) and builds the engine; the plugin's ``ServerArgs.resolve_once`` hook then gives it
the CLI's adjustments (decode and prefill CUDA graphs off, mixed chunk off). Setting
``LAVA_SGLANG_KV_CONFIG`` yourself (JSON of ``CompressionConfig`` fields, e.g.
``{"policy": "lava", "budget": 128}``) before ``sglang.Engine(...)`` does the same.
"""

from __future__ import annotations

import dataclasses
import json
import os

from lava_sglang import cpu
from lava_sglang.config import CompressionConfig, ConfigError
from lava_sglang.server_args_patch import ENV_VAR


def split_kwargs(kwargs: dict) -> tuple[CompressionConfig, dict]:
    """(the compression config of the ``kv_*`` keyword arguments, the rest)."""
    fields = {CompressionConfig.key(f.name): f.name for f in dataclasses.fields(CompressionConfig)}
    values, rest = {}, {}
    for key, value in kwargs.items():
        if key in fields:
            values[fields[key]] = value
        elif key.startswith("kv_"):
            raise ConfigError(key, f"unknown compression setting; known: {', '.join(sorted(fields))}")
        else:
            rest[key] = value
    return CompressionConfig(**values).validate(name=CompressionConfig.key), rest


def Engine(**kwargs):
    """``sglang.Engine(**kwargs)`` with the ``kv_*`` keyword arguments as its compression settings."""
    config, rest = split_kwargs(kwargs)
    cpu.install_if_needed()  # SGLang's CPU engine imports sgl_kernel with sglang itself
    import sglang  # the engine, only when one is built (this module is imported without SGLang too)

    os.environ[ENV_VAR] = json.dumps(dataclasses.asdict(config))
    return sglang.Engine(**rest)
