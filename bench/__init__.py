"""Benchmarks for langchain-budgetguard: ``python -m bench.run`` (see bench/README.md)."""
