"""PNG plots of a run (matplotlib imported lazily, Agg backend).

* ``quality.png``: perplexity, cloze accuracy, generation agreement and passkey accuracy against
  sparsity, one line per method, the dense model as the sparsity-0 point.
* ``speedup.png``: prefill speed-up over dense against context length, one panel per dtype and
  batch, measured (solid) and FLOP-ideal (dashed) per method.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

_QUALITY_PANELS = (
    ("perplexity", "perplexity (lower is better)"),
    ("cloze_accuracy", "last-word cloze accuracy"),
    ("gen_agreement", "greedy tokens equal to dense"),
    ("passkey_mean", "passkey retrieval accuracy"),
)


class Results(Protocol):
    """What the plots read of a run's results (:class:`benchmarks.suite.report.BenchResults`)."""

    meta: dict[str, Any]
    quality: list[Any]
    speed: list[Any]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(results: Results, path: Path) -> Path:
    """Quality vs sparsity per method."""
    plt = _pyplot()
    dense = next((r for r in results.quality if r.method == "dense"), None)
    methods = list(dict.fromkeys(r.method for r in results.quality if r.method != "dense"))
    fig, axes = plt.subplots(1, len(_QUALITY_PANELS), figsize=(4.2 * len(_QUALITY_PANELS), 3.6))
    for ax, (attr, title) in zip(axes, _QUALITY_PANELS):
        for method in methods:
            rows = sorted((r for r in results.quality if r.method == method), key=lambda r: r.sparsity)
            xs = [r.sparsity for r in rows]
            ys = [getattr(r, attr) for r in rows]
            if dense is not None:
                xs, ys = [0.0] + xs, [getattr(dense, attr)] + ys
            ax.plot(xs, ys, marker="o", label=method)
        if dense is not None:
            ax.axhline(getattr(dense, attr), color="grey", linestyle=":", linewidth=1)
        if attr == "perplexity":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results.meta.get('model')}: quality vs sparsity", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speedup(results: Results, path: Path) -> Path:
    """Prefill speed-up vs context length, measured and FLOP-ideal."""
    plt = _pyplot()
    rows = [r for r in results.speed if r.kind == "prefill" and r.method != "dense"]
    panels = sorted({(r.dtype, r.batch) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(f"{r.method}@{r.sparsity:g}" for r in rows))
    for ax, (dtype, batch) in zip(axes[0], panels):
        for i, label in enumerate(labels):
            series = sorted((r for r in rows if f"{r.method}@{r.sparsity:g}" == label and (r.dtype, r.batch) == (dtype, batch)),
                            key=lambda r: r.context)
            if not series:
                continue
            color = colors[i % len(colors)]
            xs = [r.context for r in series]
            ax.plot(xs, [r.speedup for r in series], marker="o", color=color, label=f"{label} measured")
            if label != "orthorank@0":
                ax.plot(xs, [r.ideal_speedup for r in series], linestyle="--", color=color, alpha=0.7, label=f"{label} FLOP ideal")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        contexts = sorted({r.context for r in rows if (r.dtype, r.batch) == (dtype, batch)})
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("prefill speed-up over dense")
        ax.set_title(f"{dtype}, batch {batch}, {results.meta.get('threads')} threads", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results.meta.get('model')}: time to first token (logits_to_keep=1)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(results: Results, folder: Path) -> list[Path]:
    """The plots this run has data for."""
    written = []
    if results.quality:
        written.append(plot_quality(results, folder / "quality.png"))
    if any(r.kind == "prefill" for r in results.speed):
        written.append(plot_speedup(results, folder / "speedup.png"))
    return written
