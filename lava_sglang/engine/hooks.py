"""The SGLang hooks of the engine integration. One list, checked at start-up by ``plugin.register``."""

from __future__ import annotations

import logging
import sys

from lava_sglang.server_args_patch import config_of

logger = logging.getLogger("lava_sglang")

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
INTERNAL_STATE = "sglang.srt.managers.scheduler_components.internal_state.InternalState"


def before_scheduler_init(self, server_args, *args, **kwargs):
    """Refuse to start with settings compression cannot run with (one error line, exit 1)."""
    config = config_of(server_args)
    if not config.enabled:
        return None
    from sglang.srt.arg_groups.model_override_base import resolving_view

    from lava_sglang.engine.startup_checks import unsupported_settings

    problems = unsupported_settings(resolving_view(server_args))
    if problems:
        message = f"lava-sglang: --kv-policy {config.policy} cannot run with: " + "; ".join(problems)
        logger.error(message)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(1)
    logger.info("lava-sglang: KV compression %s", config.to_dict())
    return None


def after_get_init_info(result, self, *args, **kwargs):
    """Expose the compression settings in the scheduler's info (merged into ``/server_info``)."""
    result["kv_compression"] = config_of(self.server_args).to_dict()
    return result


def hook_specs():
    """(target, function, hook type, needed only with compression) for each engine hook."""
    return [
        (f"{SCHEDULER}.__init__", before_scheduler_init, "BEFORE", False),
        (f"{SCHEDULER}.get_init_info", after_get_init_info, "AFTER", False),
    ]
