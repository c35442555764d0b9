"""Figures for the sink and saturation profiles.

matplotlib is imported inside the functions and figures are drawn on their own Agg canvas, so the
caller's pyplot backend and state are left untouched.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .saturation import SaturationProfile
from .sink import SinkProfile

logger = logging.getLogger(__name__)


def _new_figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        logger.info("wrote %s", path)


def _title(meta: dict[str, Any], what: str) -> str:
    name = str(meta.get("model") or "model")
    return f"{what}: {Path(name).name if Path(name).exists() else name}"


def plot_sink_profile(profile: SinkProfile, path: str | Path | None = None) -> Any:
    """Four panels against the layer index: cosine to the sink, state change, sink attention, selection overlap.

    Returns the matplotlib ``Figure`` (also saved to ``path`` when given).
    """
    fig, axes = _new_figure(2, 2, (11.0, 7.5))
    layers = list(range(profile.num_layers))
    q = profile.cos_quantiles

    ax = axes[0][0]
    ax.fill_between(layers, q["0.1"], q["0.9"], alpha=0.2, color="C0", label="10–90% of tokens")
    ax.fill_between(layers, q["0.25"], q["0.75"], alpha=0.35, color="C0", label="25–75%")
    ax.plot(layers, q["0.5"], color="C0", label="median cos")
    ax.plot(layers, profile.abs_cos_mean, color="C3", ls="--", label="mean |cos| (OrthoRank score)")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set(title="cos(norm(h_i), norm(h_sink)) at each layer's input", xlabel="layer", ylabel="cosine")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    ax.plot(layers[1:], profile.sink_change[1:], marker=".", label="sink")
    ax.plot(layers[1:], profile.token_change[1:], marker=".", label="other tokens (mean)")
    ax.set_yscale("log")
    ax.set(title="direction change from the previous layer", xlabel="layer", ylabel="1 - cos(h^l, h^(l-1))")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    if profile.sink_attention is not None:
        ax.plot(layers, profile.sink_attention, marker=".", color="C2")
        ax.set_ylim(0.0, 1.0)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="attention weight on the sink (mean over heads, queries)", xlabel="layer", ylabel="share")

    ax = axes[1][1]
    ax.plot(layers[1:], profile.overlap[1:], marker=".", color="C4", label="OrthoRank selection")
    if not math.isnan(profile.random_overlap):
        ax.axhline(profile.random_overlap, color="grey", ls="--", label="two random selections")
    ax.set_ylim(0.0, 1.0)
    ax.set(
        title=f"selected tokens shared with the previous layer (keep {profile.keep_ratio:.2f})",
        xlabel="layer",
        ylabel="overlap",
    )
    ax.legend(fontsize=8)

    fig.suptitle(_title(profile.meta, f"Sink profile ({profile.n_rows} rows, {profile.n_tokens} tokens)"))
    _save(fig, path)
    return fig


def plot_saturation_profile(profile: SaturationProfile, path: str | Path | None = None) -> Any:
    """Two panels: per-rank share of tokens saturated by each layer, and mean saturation layer per rank.

    Returns the matplotlib ``Figure`` (also saved to ``path`` when given).
    """
    fig, axes = _new_figure(1, 2, (11.0, 4.2))
    layers = list(range(profile.num_layers))

    ax = axes[0][0]
    for r, counts in enumerate(profile.histogram):
        total = sum(counts)
        running, cdf = 0, []
        for c in counts:
            running += c
            cdf.append(running / total)
        ax.step(layers, cdf, where="post", label=f"top-{r + 1}")
    ax.set(title="tokens whose rank-r prediction has settled", xlabel="layer", ylabel="fraction of tokens")
    ax.set_ylim(0.0, 1.02)
    ax.legend(fontsize=8)

    ax = axes[0][1]
    ranks = list(range(1, profile.top_k + 1))
    ax.bar(ranks, profile.mean_layer, color="C1", alpha=0.7, label="mean")
    ax.plot(ranks, profile.median_layer, "ko", label="median")
    ax.set(xlabel="rank", ylabel="saturation layer", xticks=ranks)
    ax.set_title(
        f"Kendall tau(rank, layer) = {profile.rank_tau:.2f}; "
        f"top-1 early-exit bound ×{profile.early_exit_speedup:.2f}",
        fontsize=10,
    )
    ax.legend(fontsize=8)

    fig.suptitle(_title(profile.meta, f"Ordered saturation ({profile.n_tokens} tokens, logit lens)"))
    _save(fig, path)
    return fig
