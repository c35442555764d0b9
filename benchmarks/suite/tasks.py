"""Evaluation items built from plain text: last-word cloze items and passkey-retrieval prompts.

* Cloze (LAMBADA-style): a paragraph's final word is the target, everything before it the
  context. The model is right when its greedy (argmax) prediction reproduces every token of the
  word, teacher-forced.
* Passkey: a random 5-digit key hidden at a chosen depth inside repeated filler text of an exact
  token length, followed by a question; the model is right when the first number it generates
  greedily is the key.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# A paragraph's last word: letters (inner hyphens/apostrophes allowed), then closing punctuation.
_LAST_WORD = re.compile(
    r"^(?P<context>.*\S)\s+(?P<word>[^\W\d_](?:[^\W\d_]|['\-](?=[^\W\d_]))*)(?P<tail>[.!?;:,\"'”’)\]]*)\s*$",
    re.S,
)

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class ClozeItem:
    """One last-word prediction item: ``context + " " + target`` is the original paragraph."""

    context: str
    target: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cloze_item(paragraph: str, *, min_context_words: int = 20, min_target_chars: int = 2) -> ClozeItem | None:
    """The cloze item of one paragraph, or ``None`` when its last word is unusable.

    The target is the paragraph's final word without trailing punctuation; it must be made of
    letters (numbers are not predictable) and have at least ``min_target_chars`` of them. The
    context (the text before the word, closing punctuation dropped) needs ``min_context_words``.
    """
    if not isinstance(paragraph, str):
        raise TypeError(f"paragraph must be a string, got {type(paragraph).__name__}")
    match = _LAST_WORD.match(paragraph.strip())
    if match is None:
        return None
    context, word = match.group("context"), match.group("word")
    if len(word) < min_target_chars or len(context.split()) < min_context_words:
        return None
    return ClozeItem(context=context, target=word)


def cloze_items(
    texts: Iterable[str], n_items: int, *, min_context_words: int = 20, min_target_chars: int = 2
) -> list[ClozeItem]:
    """Up to ``n_items`` cloze items, at most one per text (its first usable paragraph).

    Texts are split into paragraphs at line breaks. Texts are consumed lazily.
    """
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be a positive int, got {n_items!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string")
    items: list[ClozeItem] = []
    for text in texts:
        for paragraph in text.split("\n"):
            item = cloze_item(paragraph, min_context_words=min_context_words, min_target_chars=min_target_chars)
            if item is not None:
                items.append(item)
                break
        if len(items) == n_items:
            break
    if len(items) < n_items:
        logger.warning("only %d cloze items could be built (asked for %d)", len(items), n_items)
    return items


def encode_cloze(tokenizer: Any, item: ClozeItem, max_context_tokens: int | None = None) -> tuple[list[int], int]:
    """Token ids of ``context + " " + target`` and the number of target tokens at the end.

    Context and target are tokenized separately (no special tokens) so the target's tokens are
    exactly those of ``" " + target``; a context longer than ``max_context_tokens`` keeps its end.
    """
    context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
    target = tokenizer(" " + item.target, add_special_tokens=False)["input_ids"]
    if max_context_tokens is not None and len(context) > max_context_tokens:
        context = context[-max_context_tokens:]
    if not context or not target:
        raise ValueError(f"cloze item encodes to an empty context or target: {item}")
    return list(context) + list(target), len(target)


@dataclass(frozen=True)
class PasskeyItem:
    """A passkey prompt of exactly ``length`` tokens with ``key`` at relative ``depth``."""

    input_ids: tuple[int, ...]
    key: str
    depth: float
    length: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "depth": self.depth, "length": self.length}


def passkey_item(tokenizer: Any, length: int, key: str, depth: float) -> PasskeyItem:
    """Build a passkey prompt of exactly ``length`` tokens.

    Layout: intro, filler, needle (at ``depth`` of the filler, on a filler-sentence boundary),
    filler, question. Filler tokens are repeats of one tokenized filler paragraph, cut to fit.

    Raises:
        ValueError: ``depth`` outside [0, 1], a key that is not digits, or ``length`` too short
            for intro + needle + question.
    """
    if not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if not (isinstance(key, str) and key.isdigit()):
        raise ValueError(f"key must be a string of digits, got {key!r}")

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    intro, needle, question, unit = enc(PASSKEY_INTRO), enc(PASSKEY_NEEDLE.format(key=key)), enc(PASSKEY_QUESTION), enc(PASSKEY_FILLER)
    n_fill = length - len(intro) - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for a passkey prompt (needs at least {length - n_fill} tokens)")
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    before = min(int(round(depth * n_fill / len(unit))) * len(unit), n_fill)
    ids = intro + filler[:before] + needle + filler[before:] + question
    return PasskeyItem(input_ids=tuple(ids), key=key, depth=float(depth), length=length)


def passkey_items(tokenizer: Any, lengths: Sequence[int], trials: int, *, seed: int = 0) -> list[PasskeyItem]:
    """``trials`` prompts per length, depths evenly spread over [0.1, 0.9], keys from ``seed``."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    rng = random.Random(seed)
    depths = [0.5] if trials == 1 else [0.1 + 0.8 * i / (trials - 1) for i in range(trials)]
    return [
        passkey_item(tokenizer, length, str(rng.randrange(10000, 100000)), depth)
        for length in lengths
        for depth in depths
    ]


def passkey_correct(generated: str, key: str) -> bool:
    """Whether the first run of digits in ``generated`` is exactly ``key``."""
    match = re.search(r"\d+", generated)
    return match is not None and match.group(0) == key


def token_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """How far two batches of continuations agree.

    Args:
        reference, other: LongTensor ``[n, new_tokens]`` (same shape).

    Returns:
        ``(share of positions with identical tokens, mean share of tokens before the first
        difference)``, both in [0, 1].
    """
    if reference.shape != other.shape or reference.dim() != 2:
        raise ValueError(f"expected two [n, tokens] tensors of one shape, got {tuple(reference.shape)} and {tuple(other.shape)}")
    same = reference == other
    prefix = same.long().cumprod(dim=1).sum(dim=1).float() / same.shape[1]
    return float(same.float().mean()), float(prefix.mean())


@dataclass(frozen=True)
class ChatItem:
    """A short chat question and the answers that count as correct (case-insensitive whole words)."""

    question: str
    answers: tuple[str, ...]

    def correct(self, text: str) -> bool:
        """Whether ``text`` contains one of :attr:`answers` as a whole word."""
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text, re.I) for a in self.answers)


CHAT_ITEMS: tuple[ChatItem, ...] = (
    ChatItem("What is the capital of France?", ("Paris",)),
    ChatItem("What is 2 + 3?", ("5", "five")),
    ChatItem("What color is the sky on a clear day?", ("blue",)),
    ChatItem("How many days are in a week?", ("7", "seven")),
    ChatItem("What is the largest planet in our solar system?", ("Jupiter",)),
    ChatItem("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ChatItem("At what temperature in Celsius does water freeze?", ("0", "zero")),
    ChatItem("What is the opposite of hot?", ("cold",)),
    ChatItem("How many legs does a spider have?", ("8", "eight")),
    ChatItem("What is the chemical symbol for gold?", ("Au",)),
    ChatItem("What is the capital of Japan?", ("Tokyo",)),
    ChatItem("What language is spoken in Brazil?", ("Portuguese",)),
    ChatItem("What is 10 times 10?", ("100", "one hundred")),
    ChatItem("Which animal is known as the king of the jungle?", ("lion",)),
    ChatItem("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ChatItem("How many continents are there?", ("7", "seven")),
)


def chat_prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """Token ids of ``question`` as one user turn through the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; chat agreement needs an instruction-tuned model")
    out = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def chat_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> tuple[float, float]:
    """How far chat answers (token lists of any length, ending at end-of-text) agree with the reference.

    Returns:
        ``(mean share of the reference answer's tokens before the first difference, share of
        answers identical to the reference)``, both in [0, 1].
    """
    if len(reference) != len(other) or not reference:
        raise ValueError(f"expected two equally long, non-empty lists of answers, got {len(reference)} and {len(other)}")
    prefix, exact = 0.0, 0
    for ref, out in zip(reference, other):
        ref, out = list(ref), list(out)
        same = 0
        while same < min(len(ref), len(out)) and ref[same] == out[same]:
            same += 1
        prefix += same / max(len(ref), 1)
        exact += ref == out
    return prefix / len(reference), exact / len(reference)
