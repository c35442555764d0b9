"""Calibration windows whose loss is what generation reads from a prompt.

Generation reads a prefilled prompt in two ways: the next tokens continue its end, and an answer
recalls what the prompt said earlier (a fact, a name, a number). A plan searched on whole-window
loss sees neither: it scores every prompt token's own prediction, which generation never reads
for the tokens a selection layer skips. So the windows here are scored as generation sees them
(:class:`orthorank.runner.LossRunner` with ``prompt=``: a selective prefill of the prompt, then the
answer teacher-forced through every layer), and half of them can only be answered by recall:

* continuation window: documents ``D[i+1] .. D[i+m]``, then the start of ``D[i]``; the answer is
  the rest of ``D[i]``;
* recall window: the same prompt; the answer is a span copied from ``D[i+1]``, the document
  furthest back in the prompt. A plan that breaks retrieval from the prompt pays for it here.
"""

from __future__ import annotations

import random

import torch


def generation_windows(
    docs: torch.Tensor, *, prompt_docs: int, answer: int, count: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """Continuation and recall windows built from ``docs``, and their prompt length.

    Args:
        docs: ``[n, d]`` token ids, one document per row (``n > prompt_docs``).
        prompt_docs: whole documents before the last one's start in each prompt (>= 1).
        answer: scored tokens at the end of each window (``1 <= answer < d``).
        count: windows of each kind (``None``: ``n``), ending in documents ``0 .. count-1``.
        seed: seed of the recalled spans' offsets.

    Returns:
        ``(ids, prompt)``: ``ids`` ``[2 * count, prompt + answer]`` (``count`` continuation
        windows, then ``count`` recall windows) and ``prompt = prompt_docs * d + d - answer``.
    """
    if docs.dim() != 2:
        raise ValueError(f"docs must be [n, d] token ids, got shape {tuple(docs.shape)}")
    n, d = docs.shape
    if isinstance(prompt_docs, bool) or not isinstance(prompt_docs, int) or not 1 <= prompt_docs < n:
        raise ValueError(f"prompt_docs must be an int in [1, {n - 1}] (documents: {n}), got {prompt_docs!r}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 1 <= answer < d:
        raise ValueError(f"answer must be an int in [1, {d - 1}] (document length {d}), got {answer!r}")
    count = n if count is None else count
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= n:
        raise ValueError(f"count must be None or an int in [1, {n}], got {count!r}")
    rng = random.Random(f"orthorank-recall:{seed}")
    continuation, recall = [], []
    for i in range(count):
        earlier = [docs[(i + j) % n] for j in range(1, prompt_docs + 1)]
        prompt = torch.cat(earlier + [docs[i, : d - answer]])
        continuation.append(torch.cat([prompt, docs[i, d - answer:]]))
        start = rng.randrange(0, d - answer + 1)
        recall.append(torch.cat([prompt, earlier[0][start:start + answer]]))
    return torch.stack(continuation + recall), prompt_docs * d + d - answer
