"""Results of a run: dataclasses, JSON/CSV files and the one-screen summary table."""

from __future__ import annotations

import csv
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .plots import plot_all
from .speed import SpeedRow

logger = logging.getLogger(__name__)


@dataclass
class QualityRow:
    """Quality of one method at one sparsity (``dense`` has sparsity 0).

    Attributes:
        plan_sparsity: the plan's actual sparsity (the nominal one is rounded to whole layers).
        perplexity: on held-out windows.
        cloze_accuracy: share of last words predicted exactly.
        gen_agreement: share of greedy continuation tokens identical to the dense model's.
        gen_prefix: mean share of continuation tokens before the first difference from dense.
        passkey: retrieval accuracy per context length (str keys for JSON).
        passkey_mean: over all lengths.
        next_token_nll: mean NLL of the token right after a prefill of a sampled prefix (the model
            sees only the prefix, as in generation); ``next_token_ppl`` is its ``exp``.
        chat_prefix: mean share of the dense chat answer's tokens before the first difference.
        chat_exact: share of chat answers identical to dense.
        chat_correct: share of chat answers that contain the expected answer.
    """

    method: str
    sparsity: float
    plan_sparsity: float
    perplexity: float
    cloze_accuracy: float
    gen_agreement: float
    gen_prefix: float
    passkey: dict[str, float]
    passkey_mean: float
    seconds: float
    layers: str | None = None
    next_token_nll: float | None = None
    next_token_ppl: float | None = None
    chat_prefix: float | None = None
    chat_exact: float | None = None
    chat_correct: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        row = {k: v for k, v in self.to_dict().items() if k != "passkey"}
        row.update({f"passkey_{k}": v for k, v in self.passkey.items()})
        return row


@dataclass
class BenchResults:
    """Everything a run measured plus how (settings, machine)."""

    meta: dict[str, Any]
    quality: list[QualityRow] = field(default_factory=list)
    speed: list[SpeedRow] = field(default_factory=list)
    plans: dict[str, Any] = field(default_factory=dict)
    #: per-layer prefill profiles by method label (see :mod:`benchmarks.suite.profile`)
    profile: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def start(cls, settings: Any, model: Any) -> "BenchResults":
        meta = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "settings": settings.to_dict(),
            "model": settings.model or "smollm2-135m",
            "model_type": model.config.model_type,
            "num_layers": model.config.num_hidden_layers,
            "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(),
        }
        try:
            import transformers

            meta["transformers"] = transformers.__version__
        except ImportError:  # pragma: no cover - a dependency
            pass
        return cls(meta=meta)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchResults":
        """Inverse of :meth:`to_dict` (e.g. to redraw the plots of a ``results.json``)."""
        return cls(
            meta=dict(data.get("meta") or {}),
            quality=[QualityRow(**row) for row in data.get("quality") or []],
            speed=[SpeedRow(**row) for row in data.get("speed") or []],
            plans=dict(data.get("plans") or {}),
            profile=dict(data.get("profile") or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> "BenchResults":
        """Read a ``results.json`` (or the folder holding one)."""
        path = Path(path)
        return cls.from_dict(json.loads((path / "results.json" if path.is_dir() else path).read_text()))

    def finish(self) -> None:
        self.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "quality": [r.to_dict() for r in self.quality],
            "speed": [r.to_dict() for r in self.speed],
            "plans": self.plans,
            "profile": self.profile,
        }

    def write(self, folder: str | Path) -> list[Path]:
        """``results.json``, ``quality.csv``, ``speed.csv``, ``summary.txt`` and the plots."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / "results.json"]
        written[0].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if self.quality:
            written.append(write_csv(folder / "quality.csv", [r.flat() for r in self.quality]))
        if self.speed:
            written.append(write_csv(folder / "speed.csv", [{k: v for k, v in r.to_dict().items() if k != "times_s"} for r in self.speed]))
        summary = folder / "summary.txt"
        summary.write_text(summary_table(self) + "\n")
        written.append(summary)
        written.extend(plot_all(self, folder))
        return written


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows of dicts as CSV (columns: the union of keys, first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def quality_table(rows: list[QualityRow]) -> str:
    """Markdown table: one line per method and sparsity."""
    lengths = list(rows[0].passkey) if rows else []
    head = ["method", "sparsity", "ppl ↓", "next-token ppl ↓", "cloze ↑", "gen agree ↑", "gen prefix ↑",
            "chat prefix ↑", "chat exact ↑", "chat correct ↑"] + [f"passkey {n} ↑" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, f"{r.sparsity:g} ({r.plan_sparsity:.3f})", f"{r.perplexity:.2f}", _fmt(r.next_token_ppl, ".2f"),
                 f"{r.cloze_accuracy:.3f}", f"{r.gen_agreement:.3f}", f"{r.gen_prefix:.3f}", _fmt(r.chat_prefix, ".3f"),
                 _fmt(r.chat_exact, ".3f"), _fmt(r.chat_correct, ".3f")] + [f"{r.passkey[n]:.2f}" for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_table(rows: list[SpeedRow]) -> str:
    """Markdown table: measured speed-up over dense (FLOP ideal in brackets) per setting."""
    settings = sorted({(r.kind, r.dtype, r.batch, r.context) for r in rows}, key=lambda k: (k[0] != "prefill", k))
    labels = list(dict.fromkeys(r.method if r.method == "dense" else f"{r.method}@{r.sparsity:g}" for r in rows))
    labels = [lab for lab in labels if lab != "dense"]
    head = ["kind", "dtype", "batch", "context", "dense ms"] + labels
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = {(r.kind, r.dtype, r.batch, r.context, r.method if r.method == "dense" else f"{r.method}@{r.sparsity:g}"): r for r in rows}
    for key in settings:
        dense = index.get((*key, "dense"))
        cells = [key[0], key[1], str(key[2]), str(key[3]), _fmt(dense.median_s * 1e3 if dense else None, ".1f")]
        for lab in labels:
            r = index.get((*key, lab))
            cells.append("-" if r is None else f"{r.speedup:.2f}× ({r.ideal_speedup:.2f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    memory = [r for r in rows if r.peak_mb is not None]
    if memory:
        lines.append("")
        lines.append("peak prefill tensor memory (MiB, ratio to dense): " + ", ".join(
            f"{r.method if r.method == 'dense' else f'{r.method}@{r.sparsity:g}'} {r.dtype} b{r.batch}×{r.context}: "
            f"{r.peak_mb:.0f} ({r.memory_ratio:.2f})" for r in memory))
    decode = [r for r in rows if r.kind == "decode" and r.tokens_per_s is not None]
    if decode:
        lines.append("decode tokens/s: " + ", ".join(
            f"{r.method if r.method == 'dense' else f'{r.method}@{r.sparsity:g}'} {r.dtype}: {r.tokens_per_s:.1f}" for r in decode))
    return "\n".join(lines)


def summary_table(results: BenchResults) -> str:
    """The one-screen summary printed at the end of a run."""
    parts = [f"model {results.meta.get('model')} · threads {results.meta.get('threads')} · torch {results.meta.get('torch')}"]
    if results.quality:
        parts += ["", "Quality (sparsity: nominal (plan's actual)); quality dtype "
                  + str(results.meta.get("settings", {}).get("quality_dtype")), quality_table(results.quality)]
    if results.speed:
        parts += ["", "Speed-up over dense, median of repeats, methods interleaved: measured (FLOP ideal)",
                  speed_table(results.speed)]
    for label, layers in results.profile.items():
        parts.append(profile_line(label, layers))
    return "\n".join(parts)


def profile_line(label: str, layers: list[dict[str, Any]]) -> str:
    """Mean per-layer milliseconds of dense and selection layers in one profile."""
    out = []
    for kind, rows in (("dense layers", [r for r in layers if r["keep_ratio"] == 1.0]),
                       ("selection layers", [r for r in layers if 0.0 < r["keep_ratio"] < 1.0])):
        if rows:
            mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
            mlp = sum(r["parts_ms"]["mlp"] for r in rows) / len(rows)
            out.append(f"{kind} {mean('total_ms'):.2f} ms (mlp {mlp:.2f}, attention+select {mean('other_ms'):.2f})")
    return f"profile {label}: " + "; ".join(out)
