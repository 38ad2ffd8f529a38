"""Scheduler start and what it shows: refuse, with one line, settings compression cannot run
with (``engine.startup_checks``); the settings in ``/server_info``; the live compression state
in ``/server_info`` -> ``internal_states[i]["kv_compression"]``. No SGLang import at module level.
"""

from __future__ import annotations

import logging

from lava_sglang.engine import metrics
from lava_sglang.engine.accounting import snapshot
from lava_sglang.engine.settings import refuse_to_start, set_server_config
from lava_sglang.engine.startup_checks import unsupported_settings
from lava_sglang.engine.state import REGISTRY
from lava_sglang.server_args_patch import config_of

logger = logging.getLogger("lava_sglang")

META_KEY = "kv_compression"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
INTERNAL_STATE = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"


def before_scheduler_init(self, server_args, *args, **kwargs):
    """Refuse to start with settings compression cannot run with (one error line, exit 1)."""
    config = config_of(server_args)
    set_server_config(config)
    REGISTRY.scheduler = self
    metrics.enable(getattr(server_args, "enable_metrics", False))
    if not config.enabled:
        return None
    from sglang.srt.arg_groups.model_override_base import resolving_view

    view = resolving_view(server_args)
    problems = unsupported_settings(view)
    chunk = getattr(view, "chunked_prefill_size", None)
    if config.prefill_compression == "chunked" and (chunk is None or int(chunk) <= 0):
        problems.append("--kv-prefill-compression chunked without chunked prefill (set --chunked-prefill-size)")
    if problems:
        refuse_to_start(f"lava-sglang: --kv-policy {config.policy} cannot run with: " + "; ".join(problems))
    logger.info("lava-sglang: KV compression %s", config.to_dict())
    return None


def after_get_init_info(result, self, *args, **kwargs):
    """Expose the compression settings in the scheduler's info (merged into ``/server_info``)."""
    result[META_KEY] = config_of(self.server_args).to_dict()
    return result


def after_get_internal_state(result, self, *args, **kwargs):
    """Live compression state in ``/server_info`` -> ``internal_states[i]["kv_compression"]``."""
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state[META_KEY] = snapshot(self.scheduler)
    return result


HOOKS = [
    (f"{SCHEDULER}.__init__", before_scheduler_init, "BEFORE", False),
    (f"{SCHEDULER}.get_init_info", after_get_init_info, "AFTER", False),
    (f"{INTERNAL_STATE}.get_internal_state", after_get_internal_state, "AFTER", False),
]
