"""Research scripts behind the measurements in ``benchmarks/results`` (``python -m benchmarks.experiments.NAME``)."""
