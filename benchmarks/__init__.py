"""Benchmarks, experiments and their results (run from the repository root as ``python -m benchmarks.X``).

Not installed with the package: the embedded model and text (:mod:`benchmarks.embedded`), the
benchmark suite (:mod:`benchmarks.suite`), research scripts (:mod:`benchmarks.experiments`),
results and plans (``benchmarks/results``) and the lm-eval tasks (``benchmarks/tasks``).
"""
