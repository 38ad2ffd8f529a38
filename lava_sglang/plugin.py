"""SGLang plugin entry point (entry-point group ``sglang.srt.plugins``).

``register()`` runs in every SGLang process, before SGLang parses arguments in the main process
and as the first statement of the scheduler process. It

1. makes SGLang's CPU engine runnable without a CPU build of ``sgl_kernel`` (``lava_sglang.cpu``),
2. registers the hooks: the ``--kv-*`` flags (``server_args_patch``) and the engine integration
   (``lava_sglang.engine``),
3. applies them at once and checks that every one of them took: SGLang only logs a hook that
   fails to apply, so with a policy other than ``none`` a missing hook stops the process with
   one error line instead of serving silently uncompressed (or corrupted) requests.
"""

from __future__ import annotations

import logging

from lava_sglang.server_args_patch import compression_on

logger = logging.getLogger("lava_sglang")

_registered = False


def hook_specs():
    """(target, function, hook type name, needed only when compression is on) for every hook."""
    from lava_sglang import server_args_patch
    from lava_sglang.engine import hooks as engine_hooks

    specs = [
        ("sglang.srt.server_args.ServerArgs.add_cli_args", server_args_patch.after_add_cli_args, "AFTER", False),
        ("sglang.srt.server_args.ServerArgs.from_cli_args", server_args_patch.after_from_cli_args, "AFTER", False),
        ("sglang.srt.server_args.ServerArgs.resolve_once", server_args_patch.before_resolve_once, "BEFORE", False),
    ]
    specs.extend(engine_hooks.hook_specs())
    return specs


def gated(fn, kind: str):
    """``fn`` where the server compresses; SGLang's own behaviour where it does not (``--kv-policy
    none``): an AROUND hook calls the original, a BEFORE or AFTER hook changes nothing. Only the
    hooks marked as always needed run under ``none``: the flags, the start-up report in
    ``/server_info``, and the tokenizer-side checks that protect the scheduler (an empty prompt or
    a token id outside the vocabulary gets a 400 instead of killing the scheduler's forward; a
    ``kv_*`` key asking for compression gets a 400 naming it)."""
    if kind == "AROUND":
        def hook(original, *args, **kwargs):
            return fn(original, *args, **kwargs) if compression_on() else original(*args, **kwargs)
    elif kind == "AFTER":
        def hook(result, *args, **kwargs):
            return fn(result, *args, **kwargs) if compression_on() else None
    else:
        def hook(*args, **kwargs):
            return fn(*args, **kwargs) if compression_on() else None
    hook.__name__ = hook.__qualname__ = getattr(fn, "__name__", "hook")
    hook.__wrapped__ = fn
    return hook


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from lava_sglang import cpu

    cpu.install_if_needed()

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    specs = hook_specs()
    for target, fn, kind, only_when_on in specs:
        HookRegistry.register(target, gated(fn, kind) if only_when_on else fn, getattr(HookType, kind))
    # load_plugins() applies hooks right after the plugins ran; doing it here (idempotent) lets
    # us check the outcome in the same process.
    HookRegistry.apply_hooks()
    missing = [target for target, _, _, _ in specs if target not in HookRegistry._patched]
    if missing:
        from lava_sglang.server_args_patch import config_of

        try:
            enabled = config_of(None).enabled
        except Exception:
            enabled = True
        if enabled:
            from lava_sglang.engine.settings import refuse_to_start

            refuse_to_start("lava-sglang: refusing to start: these SGLang hooks failed to apply (is sglang==0.5.23 "
                            "installed?): " + ", ".join(missing))
        logger.warning("lava-sglang: hooks failed to apply (compression is off, so SGLang runs unchanged): %s", ", ".join(missing))
