"""Benchmarks of keysvc: RPC cost, pool scale, memory and start-up, allocation.

``make bench`` (``python -m bench``) runs all four and writes ``bench/RESULTS.md``;
``tests/bench/test_smoke.py`` runs each one briefly in ``make test``.
"""
