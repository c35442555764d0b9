"""Validate the ``keep_recent`` default and the self-calibration recipe on chat questions they were
not chosen on.

Both were picked on the 16 questions of ``benchmarks.suite.tasks.CHAT_ITEMS``; this script asks 32
other short questions (greedy, 24 tokens, chat template, left-padded batch) of the dense model and
of plans at sparsity 0.2 under several ``keep_recent`` values, and counts right answers.

    python -m benchmarks.experiments.chat_validation --threads 2 --out benchmarks/results/selfcalib/chat_validation.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.embedded import load_model
from benchmarks.experiments.heldout import compared_plans, sweep_keep_recent
from benchmarks.suite.quality import chat_answers
from benchmarks.suite.tasks import ChatItem, chat_agreement

QUESTIONS: tuple[ChatItem, ...] = (
    ChatItem("What is the capital of Italy?", ("Rome",)),
    ChatItem("What is the capital of Germany?", ("Berlin",)),
    ChatItem("What is the capital of Spain?", ("Madrid",)),
    ChatItem("What is the capital of the United Kingdom?", ("London",)),
    ChatItem("What is 4 + 4?", ("8", "eight")),
    ChatItem("What is 9 minus 3?", ("6", "six")),
    ChatItem("What is 5 times 3?", ("15", "fifteen")),
    ChatItem("How many hours are in a day?", ("24", "twenty-four")),
    ChatItem("How many months are in a year?", ("12", "twelve")),
    ChatItem("How many minutes are in an hour?", ("60", "sixty")),
    ChatItem("What color is grass?", ("green",)),
    ChatItem("What color are ripe bananas?", ("yellow",)),
    ChatItem("What is the opposite of up?", ("down",)),
    ChatItem("What is the opposite of big?", ("small", "little")),
    ChatItem("What is the freezing point of water in Fahrenheit?", ("32",)),
    ChatItem("What is the boiling point of water in Celsius?", ("100",)),
    ChatItem("Which planet is known as the Red Planet?", ("Mars",)),
    ChatItem("What is the closest star to Earth?", ("Sun",)),
    ChatItem("What is the chemical symbol for water?", ("H2O",)),
    ChatItem("What is the chemical symbol for oxygen?", ("O",)),
    ChatItem("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ChatItem("Who developed the theory of relativity?", ("Einstein",)),
    ChatItem("What is the largest ocean on Earth?", ("Pacific",)),
    ChatItem("What is the tallest mountain in the world?", ("Everest",)),
    ChatItem("What language is spoken in France?", ("French",)),
    ChatItem("What language is spoken in Germany?", ("German",)),
    ChatItem("What animal says moo?", ("cow",)),
    ChatItem("How many sides does a triangle have?", ("3", "three")),
    ChatItem("How many sides does a square have?", ("4", "four")),
    ChatItem("What do bees make?", ("honey",)),
    ChatItem("What is frozen water called?", ("ice",)),
    ChatItem("What is the first letter of the English alphabet?", ("A",)),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recent", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--plans", nargs="*", default=[], help="NAME=PLAN.json plans to add to the shipped and self-calibrated ones")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(None, dtype=torch.bfloat16)
    questions = [q.question for q in QUESTIONS]

    def ask() -> dict:
        answers = chat_answers(model, tok, questions)
        texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
        return {"correct": sum(q.correct(t) for q, t in zip(QUESTIONS, texts)), "ids": answers, "text": texts}

    results = {"dense": ask()}
    print("dense", results["dense"]["correct"], "/", len(QUESTIONS), flush=True)
    dense = results["dense"]["ids"]

    def measure() -> dict:
        row = ask()
        row["prefix"], row["exact"] = (round(v, 3) for v in chat_agreement(dense, row["ids"]))
        return row

    sweep_keep_recent(model, compared_plans(model, args.plans), args.recent, measure, results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
