"""Long-prompt tasks built from real prose: pass-key retrieval, long-document questions, next-token probes.

Every prompt is built in token ids, so all prompts of one length have exactly that many tokens and
run as one unpadded batch. The filler is ordinary prose (never a repeated sentence): Wikipedia lead
extracts of the evaluation split, or English prose installed on the machine from outside the wiki
data (licences, manuals; :data:`OUTSIDE_FILES`). A fact is placed at a sentence boundary near a
chosen depth of the filler; the question comes at the end.

* Pass key: an opening line saying a pass key is hidden in the text, then
  ``" The pass key is 48213. Remember it. 48213 is the pass key."`` somewhere in the
  prose, then ``"\\n\\nWhat is the pass key? The pass key is"``. Right when the first number the
  model generates is the key.
* Long-document QA: three facts of one kind about three different people, each stated once at its
  own depth (``"Maria lives in the town of Dunmore."``), then a question about one of them
  (``"\\n\\nQuestion: In which town does Maria live?\\nAnswer: Maria lives in the town of"``).
  Right when the first word generated is the answer (exact match, case and punctuation ignored).
* Next-token probes: a prose window cut after ``n`` tokens (``n`` log-uniform in a range); the
  NLL of token ``n + 1`` after a prefill of the first ``n``.
"""

from __future__ import annotations

import gzip
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: English prose from outside the Wikipedia data (Debian installs these files).
OUTSIDE_FILES: tuple[str, ...] = (
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/GFDL-1.3",
    "/usr/share/common-licenses/Apache-2.0",
    "/usr/share/common-licenses/MPL-2.0",
)

PASSKEY_INTRO = "A pass key is hidden somewhere in the text below. Find it and remember it.\n\n"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"

NAMES = ("Maria", "Tomas", "Aisha", "Kenji", "Olga", "Pedro", "Ingrid", "Rahul", "Fatima", "Lukas",
         "Chen", "Amara", "Igor", "Sofia", "Jonas", "Leila")
#: (fact template, question template, answer choices): one kind of fact per item
FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (" {name} lives in the town of {value}.", "In which town does {name} live?\nAnswer: {name} lives in the town of",
     ("Dunmore", "Kelby", "Arlow", "Penford", "Troskey", "Wyncliff", "Barrow", "Elsmere", "Corran", "Halden")),
    (" The favourite colour of {name} is {value}.", "What is the favourite colour of {name}?\nAnswer: The favourite colour of {name} is",
     ("purple", "orange", "green", "silver", "yellow", "brown", "pink", "violet", "turquoise", "crimson")),
    (" {name} keeps a pet {value} at home.", "Which pet does {name} keep at home?\nAnswer: {name} keeps a pet",
     ("parrot", "rabbit", "tortoise", "hamster", "goldfish", "ferret", "lizard", "canary", "snake", "hedgehog")),
    (" The secret word of {name} is {value}.", "What is the secret word of {name}?\nAnswer: The secret word of {name} is",
     ("lantern", "harbor", "velvet", "meadow", "copper", "thistle", "glacier", "marble", "saffron", "willow")),
)


@dataclass(frozen=True)
class Prompt:
    """One long prompt: ``ids`` (exactly ``length`` tokens), the expected ``answer``, and where the
    fact sits (``depth``, relative position in the prompt)."""

    task: str
    ids: tuple[int, ...]
    answer: str
    depth: float
    filler: str

    @property
    def length(self) -> int:
        return len(self.ids)


def read_prose(path: str) -> str:
    """A text file's paragraphs with white space collapsed (``.gz`` read as gzip)."""
    raw = gzip.open(path, "rt").read() if path.endswith(".gz") else Path(path).read_text()
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", raw)]
    return "\n\n".join(p for p in paragraphs if p)


def prose_stream(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token ids of ``texts`` joined by blank lines (no special tokens)."""
    return list(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])


#: The Wikipedia filler is the first this many evaluation extracts.
WIKI_FILLER_DOCS = 400


def wiki_filler(tokenizer: Any, wiki: Sequence[str]) -> list[int]:
    """Token ids of the Wikipedia filler: the first :data:`WIKI_FILLER_DOCS` extracts of ``wiki``."""
    return prose_stream(tokenizer, list(wiki)[:WIKI_FILLER_DOCS])


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sentence_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Positions just after a token that ends a sentence (``.``, ``!``, ``?``)."""
    ends = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(ids))):
        if piece.rstrip().endswith((".", "!", "?")):
            ends.append(i + 1)
    return ends


def _insert(tokenizer: Any, filler: list[int], pieces: list[tuple[float, list[int]]]) -> tuple[list[int], list[float]]:
    """``filler`` with each ``(depth, ids)`` piece inserted at the sentence end nearest that depth.

    Returns the ids and each piece's start as a fraction of the result's length (input order).
    """
    ends = _sentence_ends(tokenizer, filler) or [len(filler)]
    cuts = [min(ends, key=lambda e: abs(e - depth * len(filler))) for depth, _ in pieces]
    order = sorted(range(len(pieces)), key=lambda i: cuts[i])
    out: list[int] = []
    starts = [0.0] * len(pieces)
    previous = 0
    for i in order:
        out += filler[previous:cuts[i]]
        starts[i] = len(out)
        out += pieces[i][1]
        previous = cuts[i]
    out += filler[previous:]
    return out, [s / max(len(out), 1) for s in starts]


def _filler(stream: list[int], n: int, rng: random.Random) -> list[int]:
    if len(stream) < n:
        raise ValueError(f"the filler text has {len(stream)} tokens, fewer than the {n} a prompt needs")
    start = rng.randrange(0, len(stream) - n + 1)
    return stream[start:start + n]


def passkey_prompts(
    tokenizer: Any, fillers: dict[str, list[int]], length: int, n: int, *, seed: int = 0
) -> list[Prompt]:
    """``n`` pass-key prompts of exactly ``length`` tokens; keys, depths (uniform in [0.05, 0.95])
    and filler offsets from ``seed``; filler texts taken in turn from ``fillers``."""
    rng = random.Random(f"passkey-{length}-{seed}")
    intro, question = _encode(tokenizer, PASSKEY_INTRO), _encode(tokenizer, PASSKEY_QUESTION)
    names = sorted(fillers)
    prompts = []
    for i in range(n):
        key = str(rng.randrange(10000, 100000))
        needle = _encode(tokenizer, NEEDLE.format(key=key))
        budget = length - len(intro) - len(needle) - len(question)
        if budget < 16:
            raise ValueError(f"length {length} is too short for a pass-key prompt")
        name = names[i % len(names)]
        depth = rng.uniform(0.05, 0.95)
        body, starts = _insert(tokenizer, _filler(fillers[name], budget, rng), [(depth, needle)])
        ids = intro + body + question
        prompts.append(Prompt("passkey", tuple(ids), key, (len(intro) + starts[0] * len(body)) / len(ids), name))
    return prompts


def qa_prompts(tokenizer: Any, fillers: dict[str, list[int]], length: int, n: int, *, seed: int = 0) -> list[Prompt]:
    """``n`` long-document questions of exactly ``length`` tokens (three facts, one asked)."""
    rng = random.Random(f"qa-{length}-{seed}")
    names = sorted(fillers)
    prompts = []
    for i in range(n):
        fact, question, choices = FACTS[i % len(FACTS)]
        people = rng.sample(NAMES, 3)
        values = rng.sample(choices, 3)
        pieces = [(rng.uniform(0.05, 0.9), _encode(tokenizer, fact.format(name=p, value=v))) for p, v in zip(people, values)]
        asked = rng.randrange(3)
        tail = _encode(tokenizer, "\n\nQuestion: " + question.format(name=people[asked]))
        budget = length - sum(len(p[1]) for p in pieces) - len(tail)
        if budget < 16:
            raise ValueError(f"length {length} is too short for a question prompt")
        name = names[i % len(names)]
        body, starts = _insert(tokenizer, _filler(fillers[name], budget, rng), pieces)
        prompts.append(Prompt("qa", tuple(body + tail), values[asked], starts[asked], name))
    return prompts


_NUMBER = re.compile(r"\d+")
_WORD = re.compile(r"[A-Za-z]+")


def is_right(prompt: Prompt, generated: str) -> bool:
    """Pass key: the first number generated is the key; QA: the first word generated is the answer."""
    pattern = _NUMBER if prompt.task == "passkey" else _WORD
    found = pattern.search(generated)
    return found is not None and found.group(0).lower() == prompt.answer.lower()


def prose_windows(tokenizer: Any, wiki: Sequence[str], window: int, n: int) -> "torch.Tensor":
    """``[n, window]`` prose windows for next-token probes and whole-window perplexity: half from
    the outside prose, half from ``wiki`` texts, each window cut from its own stream in order."""
    import torch

    half = n // 2
    streams = [prose_stream(tokenizer, [read_prose(f) for f in OUTSIDE_FILES]), prose_stream(tokenizer, list(wiki))]
    rows = []
    for stream, count in zip(streams, (half, n - half)):
        if len(stream) < count * window:
            raise ValueError(f"{count} windows of {window} tokens need {count * window} tokens; the text has {len(stream)}")
        rows += [stream[i * window:(i + 1) * window] for i in range(count)]
    return torch.tensor(rows)


def probe_lengths(low: int, high: int, n: int, *, seed: int = 0) -> list[int]:
    """``n`` prefix lengths, log-uniform in ``[low, high]`` (seeded)."""
    rng = random.Random(f"probes-{seed}")
    return [int(round(low * (high / low) ** rng.random())) for _ in range(n)]


def batches(prompts: Sequence[Prompt], size: int) -> Iterator[list[Prompt]]:
    """Prompts in groups of ``size`` (all of one length: no padding needed)."""
    for start in range(0, len(prompts), size):
        yield list(prompts[start:start + size])
