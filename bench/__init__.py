"""Speed and memory benchmarks: ``python -m bench.run_all`` (``make bench``) writes ``bench/results.md``.

Each module is one bench with ``run() -> list[dict]``; run one alone with ``python -m bench.<name>``.
"""
