"""The docs say what the code does (no server): every ``--kv-*`` flag and per-request ``kv_*`` key
the README and docs/ name exists, and every declared one is documented; every ``make`` target and
every flag of a benchmark command shown exists (each benchmark's own ``--help``); every relative
link and anchor resolves; no committed doc or result holds an absolute path of a machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lava_sglang.config import CompressionConfig, flag_table
from lava_sglang.server_args_patch import add_cli_args

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
USER_DOCS = [ROOT / "README.md", ROOT / "docs" / "usage.md", ROOT / "docs" / "conversations.md"]


def text(path: Path) -> str:
    return path.read_text()


def kv_flags() -> set[str]:
    """Ours (``server_args_patch.add_cli_args``)."""
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return {opt for action in parser._actions for opt in action.option_strings if opt.startswith(("--kv-", "--no-kv-"))}


def sglang_kv_flags() -> set[str]:
    """SGLang's own ``--kv-*`` flags (``--kv-cache-dtype``, ...), which the docs may name too."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--kv-")}


def test_kv_flags_named_in_docs_exist_and_every_flag_is_documented():
    declared = kv_flags()
    known = declared | sglang_kv_flags()
    for path in DOCS:
        unknown = set(re.findall(r"--(?:no-)?kv-[a-z-]*[a-z]", text(path))) - known
        assert not unknown, f"{path.relative_to(ROOT)} names unknown flags {sorted(unknown)}"


def test_the_flag_table_is_the_declarations():
    """docs/usage.md's flag table is ``config.flag_table()``: one row per declared setting, its
    flag, per-request key, default and help as ``config.py`` declares them."""
    usage = text(ROOT / "docs" / "usage.md")
    table = re.search(r"<!-- flags:begin -->\n(.*?)<!-- flags:end -->", usage, re.S)
    assert table, "docs/usage.md lost its flags markers"
    assert table.group(1) == flag_table(), "docs/usage.md's flag table is stale: paste `python -m lava_sglang.config`"
    assert all(f in table.group(1) for f in kv_flags())


# kv_* names in the user docs that are report fields, not settings
NOT_SETTINGS = {"kv_compression", "kv_kernels", "kv_dtype"}


def test_per_request_keys_named_in_user_docs_exist_and_every_key_is_documented():
    keys = {CompressionConfig.key(f) for f, spec in CompressionConfig.knobs().items() if not spec.server_only}
    for path in USER_DOCS:
        unknown = set(re.findall(r'["`](kv_[a-z_]+)["`]', text(path))) - keys - NOT_SETTINGS
        assert not unknown, f"{path.relative_to(ROOT)} names unknown settings {sorted(unknown)}"
    documented = text(ROOT / "README.md") + text(ROOT / "docs" / "usage.md") + text(ROOT / "docs" / "conversations.md")
    assert not {k for k in keys if k not in documented}, sorted(k for k in keys if k not in documented)


def test_make_targets_shown_exist():
    makefile = text(ROOT / "Makefile")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    for path in DOCS:
        shown = set(re.findall(r"`make ([a-z][a-z-]*)", text(path))) | set(re.findall(r"^make ([a-z][a-z-]*)", text(path), re.M))
        assert shown <= targets, f"{path.relative_to(ROOT)} shows make targets {sorted(shown - targets)} (Makefile has {sorted(targets)})"


COMMAND = re.compile(r"python (?:-m benchmarks\.([a-z_]+)|benchmarks/([a-z_]+)\.py)([^`\n]*)")


def shown_commands() -> dict[str, set[str]]:
    flags: dict[str, set[str]] = {}
    for path in DOCS:
        for mod, script, rest in COMMAND.findall(text(path)):
            flags.setdefault(mod or script, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest))
    return flags


@pytest.mark.parametrize("bench", sorted(shown_commands()))
def test_benchmark_flags_shown_exist(bench):
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{bench}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    unknown = {f for f in shown_commands()[bench] if f not in proc.stdout}
    assert not unknown, f"benchmarks.{bench}: the docs show {sorted(unknown)}, its --help has none of them"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text(path), re.M)}


def test_relative_links_and_anchors_resolve():
    broken = []
    for path in DOCS:
        body = re.sub(r"```.*?```", "", text(path), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", body):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:tmp|root|home|work|private)/[\w.-]+")


def test_no_machine_paths_in_docs_and_results():
    files = DOCS + sorted((ROOT / "benchmarks" / "results").rglob("*.md")) + sorted(
        (ROOT / "benchmarks" / "results").rglob("*.json"))
    found = []
    for path in files:
        for m in MACHINE_PATH.finditer(text(path)):
            found.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not found, "\n".join(found[:40]) + (f"\n(+{len(found) - 40} more)" if len(found) > 40 else "")
