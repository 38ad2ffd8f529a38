"""The quality benchmark (``python benchmarks/quality.py``), in parts.

``metrics`` (run keys, fidelity, summaries, slots held), ``client`` (the samples through one
server or through HF + kvpress), ``runner`` (one command line's runs, merging and saving),
``report`` (the result files and ``quality.md``), ``plots``, ``decode_tasks`` and ``decode`` (the
long generations of compression during decode, ``--decode-compression``: tasks and scores; runs,
``decode.json`` and ``decode.md``) and ``cli`` (the flags and ``main``; its docstring is the
benchmark's documentation).
"""
