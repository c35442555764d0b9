"""Benchmark suite: quality and speed of OrthoRank against dense and layer-pruning baselines.

Run ``python -m benchmarks.suite`` (quick) or ``python -m benchmarks.suite --full``; from Python::

    from benchmarks.suite import BenchSettings, run
    results, folder = run(BenchSettings.preset_settings("quick", sparsities=(0.2,)))

Speed primitives (interleaved timing, decode steps, peak tensor memory) are in
:mod:`benchmarks.suite.speed`; FLOP-ideal speed-ups in :mod:`benchmarks.suite.flops`.
"""

from .methods import METHODS, PlanCache
from .report import BenchResults, QualityRow
from .runner import run
from .settings import BenchSettings, SpeedSettings
from .speed import SpeedRow

__all__ = ["METHODS", "BenchResults", "BenchSettings", "PlanCache", "QualityRow", "SpeedRow", "SpeedSettings", "run"]
