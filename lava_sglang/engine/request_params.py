"""Per-request compression settings: ``sampling_params.custom_params`` keys ``kv_*``.

Validated where SGLang validates sampling parameters (``SamplingParams.verify``, in the
tokenizer process), so a bad value is an HTTP 400 naming the field and never reaches the
scheduler. The scheduler resolves the same overrides in ``engine.hooks.request_config``.
"""

from __future__ import annotations

from lava_sglang.config import CompressionConfig
from lava_sglang.server_args_patch import config_of


def kv_overrides(custom_params) -> dict:
    if not isinstance(custom_params, dict):
        return {}
    return {k: v for k, v in custom_params.items() if isinstance(k, str) and k.startswith("kv_")}


def resolve(base: CompressionConfig, custom_params) -> CompressionConfig:
    """``base`` with the request's overrides; raises ConfigError (a ValueError) naming the field."""
    overrides = kv_overrides(custom_params)
    if not overrides:
        return base
    if not base.enabled:
        raise ValueError(
            f"{', '.join(sorted(overrides))}: KV compression is off on this server (--kv-policy none); "
            "start it with a policy to choose compression per request"
        )
    return base.with_overrides(overrides)


def after_sampling_params_verify(result, self, *args, **kwargs):
    resolve(config_of(None), getattr(self, "custom_params", None))
    return result
