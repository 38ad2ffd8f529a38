"""lava-sglang: LAVa and related KV-cache eviction policies as an SGLang plugin."""

__version__ = "0.1.0"
