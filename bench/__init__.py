"""Benchmarks: `bench/run.py` (the whole comparison in one run) and its parts.

A package so that `bench/run.py` and the smoke test import the parts by one name
(`bench.workload`, ...); it is not installed (pyproject only packages streams, agents, tables).
"""
