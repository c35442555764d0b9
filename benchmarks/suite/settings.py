"""Settings of a benchmark run, with the ``quick`` and ``full`` presets."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from orthorank.config import check_choice

from .methods import METHODS, check_methods, check_sparsity
from .tasks import CHAT_ITEMS

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRESETS: tuple[str, ...] = ("quick", "full")


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` -> the torch dtype."""
    return DTYPES[check_choice("dtype", name, tuple(DTYPES))]


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be positive ints, got {values!r}")
    return values


@dataclass
class SpeedSettings:
    """What the speed part measures (see :mod:`benchmarks.suite.speed`)."""

    methods: tuple[str, ...] = ("dense", "orthorank", "sleb")
    sparsities: tuple[float, ...] = (0.2,)
    contexts: tuple[int, ...] = (512, 1024)
    batches: tuple[int, ...] = (1,)
    dtypes: tuple[str, ...] = ("bfloat16",)
    repeats: int = 3
    warmup: int = 1
    #: also time the patched model with sparsity 0 ("orthorank@0") against the unpatched one
    patched_zero: bool = True
    #: full forward (all logits, no cache) at (batch, context); None to skip
    forward: tuple[int, int] | None = None
    #: decode steps timed per repeat, after a prefill of decode_context tokens; 0 to skip
    decode_steps: int = 8
    decode_context: int = 512
    #: peak tensor memory of one prefill per method at the largest timed shape
    memory: bool = True
    #: per-layer time profile of dense and the first OrthoRank plan (batch 1, largest context)
    profile: bool = False
    #: skip prefill shapes with batch x context above this many tokens (None: no cap)
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        self.methods = check_methods(self.methods)
        if "dense" not in self.methods:
            self.methods = ("dense", *self.methods)
        self.sparsities = tuple(check_sparsity(s) for s in self.sparsities)
        self.contexts = _positive_ints("contexts", self.contexts)
        self.batches = _positive_ints("batches", self.batches)
        self.dtypes = tuple(check_choice("dtype", d, tuple(DTYPES)) for d in self.dtypes)
        _positive_ints("repeats", (self.repeats,))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if self.max_tokens is not None:
            _positive_ints("max_tokens", (self.max_tokens,))
        if not self.shapes():
            raise ValueError(f"no (batch, context) shape fits max_tokens={self.max_tokens}")
        if self.forward is not None:
            self.forward = tuple(_positive_ints("forward", self.forward))  # type: ignore[assignment]
            if len(self.forward) != 2:
                raise ValueError("forward must be (batch, context)")

    def shapes(self) -> list[tuple[int, int]]:
        """Prefill shapes ``(batch, context)`` timed, within ``max_tokens``."""
        return [(b, c) for b in self.batches for c in self.contexts if self.max_tokens is None or b * c <= self.max_tokens]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchSettings:
    """A whole run: model, text, methods, quality workloads and speed settings."""

    preset: str = "quick"
    model: str | None = None
    text: str | None = None
    out: str = "results/bench"
    name: str | None = None
    methods: tuple[str, ...] = METHODS
    sparsities: tuple[float, ...] = (0.2,)
    #: OrthoRank layers from calibration (True) or the data-free default plan (False)
    calibrated: bool = True
    calib_windows: int = 4
    calib_window: int = 256
    quality: bool = True
    quality_dtype: str = "bfloat16"
    ppl_windows: int = 8
    ppl_window: int = 512
    cloze_items: int = 40
    cloze_context: int = 192
    gen_prompts: int = 8
    gen_prompt_len: int = 64
    gen_tokens: int = 32
    #: prefix lengths sampled for the next-token-after-prefill NLL (on the perplexity windows); 0 skips it
    next_token_prefixes: int = 8
    #: chat questions (of :data:`benchmarks.suite.tasks.CHAT_ITEMS`) answered greedily; 0 skips them
    chat_questions: int = 16
    chat_tokens: int = 24
    passkey_lengths: tuple[int, ...] = (256, 1024)
    passkey_trials: int = 2
    batch_size: int = 8
    speed: SpeedSettings | None = field(default_factory=SpeedSettings)
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("preset", self.preset, PRESETS)
        self.methods = check_methods(self.methods)
        self.sparsities = tuple(check_sparsity(s) for s in self.sparsities)
        check_choice("quality_dtype", self.quality_dtype, tuple(DTYPES))
        self.passkey_lengths = _positive_ints("passkey_lengths", self.passkey_lengths)
        for name in ("calib_windows", "calib_window", "ppl_windows", "ppl_window", "cloze_items", "cloze_context",
                     "gen_prompts", "gen_prompt_len", "gen_tokens", "passkey_trials", "batch_size"):
            _positive_ints(name, (getattr(self, name),))
        _positive_ints("chat_tokens", (self.chat_tokens,))
        for name, high in (("next_token_prefixes", None), ("chat_questions", len(CHAT_ITEMS))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (high is not None and value > high):
                raise ValueError(f"{name} must be an int in [0, {high if high is not None else 'inf'}), got {value!r}")
        if self.threads is not None:
            _positive_ints("threads", (self.threads,))

    @classmethod
    def preset_settings(cls, preset: str = "quick", **overrides: Any) -> "BenchSettings":
        """The ``quick`` (a few minutes on 2 CPU cores) or ``full`` (README numbers) preset."""
        check_choice("preset", preset, PRESETS)
        base = cls(preset=preset)
        if preset == "full":
            base = dataclasses.replace(
                base,
                sparsities=(0.1, 0.2, 0.3),
                calib_windows=8,
                calib_window=256,
                quality_dtype="float32",
                ppl_windows=16,
                ppl_window=1024,
                cloze_items=100,
                cloze_context=256,
                gen_prompts=16,
                gen_tokens=64,
                next_token_prefixes=32,
                passkey_lengths=(1024, 2048, 4096, 8192),
                passkey_trials=3,
                speed=SpeedSettings(
                    methods=("dense", "orthorank", "sleb"),
                    sparsities=(0.2,),
                    contexts=(512, 1024, 2048, 4096),
                    batches=(1, 8),
                    dtypes=("float32", "bfloat16"),
                    repeats=5,
                    forward=(8, 1024),
                    decode_steps=16,
                    decode_context=1024,
                    max_tokens=16384,
                ),
            )
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
