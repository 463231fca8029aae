"""Benchmarks: each script times one thing and prints a markdown table and, with --bench_out, a
JSON line (benchmarks/bench_common.py). Run from the repository root, e.g.
`python -m benchmarks.bench_averaging`; docs/benchmarks.md has the figures and the commands."""
