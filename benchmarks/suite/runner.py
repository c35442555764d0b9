"""Run the benchmark: load model and text, make plans, measure quality and speed, write results."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from orthorank.patch import unpatch
from orthorank.plan import Plan
from orthorank.text import read_texts, token_windows

from .. import embedded
from . import flops, quality, speed, tasks
from .methods import PlanCache, dense_plan
from .profile import layer_profile, profile_table
from .report import BenchResults, QualityRow
from .settings import BenchSettings, SpeedSettings, torch_dtype

logger = logging.getLogger(__name__)


def load_texts(text: str | None) -> tuple[list[str], list[str]]:
    """``(calibration texts, evaluation texts)``: the wiki splits, or a file split 1 in 5 / 4 in 5."""
    if text is None:
        return embedded.wiki_texts("calib"), embedded.wiki_texts("eval")
    docs = read_texts(text)
    calib, evaluation = docs[::5], [d for i, d in enumerate(docs) if i % 5]
    if not calib or not evaluation:
        raise ValueError(f"{text}: need at least 2 documents (1 in 5 calibrates, the rest evaluates)")
    return calib, evaluation


def gen_prompts(tokenizer: Any, texts: list[str], n: int, length: int) -> torch.Tensor:
    """``[n, length]`` prompts: the first ``length`` tokens of texts that have that many."""
    rows = []
    for text in reversed(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
            if len(rows) == n:
                return torch.tensor(rows, dtype=torch.long)
    raise ValueError(f"not enough texts of {length} tokens for {n} prompts")


def _label(method: str, sparsity: float) -> str:
    return "dense" if method == "dense" else f"{method}@{sparsity:g}"


def measure_quality(model: nn.Module, tokenizer: Any, settings: BenchSettings, cache: PlanCache,
                    eval_texts: list[str]) -> list[QualityRow]:
    """Quality rows: dense once, then every method at every sparsity."""
    s = settings
    windows = token_windows(tokenizer, eval_texts, s.ppl_window, s.ppl_windows)
    items = tasks.cloze_items(eval_texts, s.cloze_items)
    prompts = gen_prompts(tokenizer, eval_texts, s.gen_prompts, s.gen_prompt_len)
    keys = tasks.passkey_items(tokenizer, s.passkey_lengths, s.passkey_trials, seed=s.seed)
    chat = list(tasks.CHAT_ITEMS[: s.chat_questions]) if getattr(tokenizer, "chat_template", None) else []
    if s.chat_questions and not chat:
        logger.warning("the tokenizer has no chat template: chat agreement is skipped")
    configs = [("dense", 0.0)] + [(m, sp) for sp in s.sparsities for m in s.methods if m != "dense"]
    rows: list[QualityRow] = []
    reference: torch.Tensor | None = None
    chat_reference: list[list[int]] | None = None
    bar = tqdm(configs, desc="quality", unit="config")
    for method, sparsity in bar:
        bar.set_postfix_str(_label(method, sparsity))
        plan = cache.get(method, model, sparsity, calibrated=s.calibrated) if method != "dense" else None
        speed.apply(model, plan)
        start = time.perf_counter()
        try:
            ppl = quality.perplexity(model, windows, batch_size=1)
            cloze = quality.cloze_accuracy(model, tokenizer, items, batch_size=s.batch_size, max_context_tokens=s.cloze_context)
            generated = quality.greedy_continuations(model, prompts, s.gen_tokens, batch_size=s.batch_size, tokenizer=tokenizer)
            found = quality.passkey_results(model, tokenizer, keys)
            next_nll = (quality.prefill_next_token_nll(model, windows, s.next_token_prefixes, seed=s.seed,
                                                       batch_size=s.batch_size) if s.next_token_prefixes else None)
            answers = quality.chat_answers(model, tokenizer, [c.question for c in chat], new_tokens=s.chat_tokens)
        finally:
            unpatch(model)
        if reference is None:
            reference = generated
        agree, prefix = tasks.token_agreement(reference, generated)
        if chat_reference is None:
            chat_reference = answers
        chat_prefix, chat_exact = tasks.chat_agreement(chat_reference, answers) if chat else (None, None)
        correct = [c.correct(tokenizer.decode(a, skip_special_tokens=True)) for c, a in zip(chat, answers)]
        by_length = {
            length: sum(ok for ok, item in zip(found, keys) if item.length == length) / s.passkey_trials
            for length in s.passkey_lengths
        }
        rows.append(QualityRow(
            method=method if plan is None or method != "orthorank" or s.calibrated else "orthorank-default",
            sparsity=sparsity,
            plan_sparsity=0.0 if plan is None else round(plan.sparsity, 4),
            perplexity=ppl,
            cloze_accuracy=cloze,
            gen_agreement=agree,
            gen_prefix=prefix,
            passkey={str(k): v for k, v in by_length.items()},
            passkey_mean=sum(found) / len(found),
            seconds=time.perf_counter() - start,
            layers=None if plan is None else _plan_summary(plan),
            next_token_nll=next_nll,
            next_token_ppl=None if next_nll is None else math.exp(next_nll),
            chat_prefix=chat_prefix,
            chat_exact=chat_exact,
            chat_correct=sum(correct) / len(correct) if chat else None,
        ))
        logger.info("%s", rows[-1])
    return rows


def _plan_summary(plan: Plan) -> str:
    sel = " ".join(str(i) for i in plan.selection_layers)
    rem = " ".join(str(i) for i in plan.removed_layers)
    return f"select[{sel}] removed[{rem}] {plan.selector}"


def speed_methods(model: nn.Module, settings: BenchSettings, sp: SpeedSettings, cache: PlanCache) -> dict[str, Plan | None]:
    """Speed methods by label: ``dense`` (unpatched), ``orthorank@0`` (patched, no selection), ``m@s``."""
    methods: dict[str, Plan | None] = {"dense": None}
    if sp.patched_zero:
        methods["orthorank@0"] = dense_plan(model)
    for sparsity in sp.sparsities:
        for method in sp.methods:
            if method != "dense":
                methods[_label(method, sparsity)] = cache.get(method, model, sparsity, calibrated=settings.calibrated)
    return methods


def _row(kind: str, label: str, plan: Plan | None, times: dict[str, list[float]], dtype: str, batch: int,
         context: int, repeats: int, ideal: float) -> speed.SpeedRow:
    method, _, nominal = label.partition("@")
    return speed.SpeedRow(
        kind=kind, method=method, sparsity=float(nominal or 0.0), dtype=dtype, batch=batch, context=context,
        threads=torch.get_num_threads(), repeats=repeats, median_s=speed.median(times[label]),
        speedup=speed.speedup(times["dense"], times[label]), ideal_speedup=ideal, times_s=times[label],
    )


def measure_speed(model: nn.Module, methods: dict[str, Plan | None], sp: SpeedSettings,
                  windows: Callable[[int, int], torch.Tensor]) -> list[speed.SpeedRow]:
    """Speed rows for every dtype x batch x context (prefill), plus forward, decode and memory.

    ``windows(batch, context)`` returns the token ids ``[batch, context]`` to run.
    """
    config = model.config
    rows: list[speed.SpeedRow] = []
    shapes = sp.shapes()
    original = next(model.parameters()).dtype
    try:
        for dtype in sp.dtypes:
            model.to(torch_dtype(dtype))
            for batch, context in tqdm(shapes, desc=f"prefill {dtype}", unit="shape"):
                ids = windows(batch, context)
                times = speed.time_prefill(model, methods, ids, repeats=sp.repeats, warmup=sp.warmup)
                for label, plan in methods.items():
                    ideal = flops.ideal_prefill_speedup(config, plan, context, 1)
                    rows.append(_row("prefill", label, plan, times, dtype, batch, context, sp.repeats, ideal))
            if sp.forward is not None:
                batch, context = sp.forward
                times = speed.time_prefill(model, methods, windows(batch, context), repeats=sp.repeats,
                                           warmup=sp.warmup, all_logits=True)
                for label, plan in methods.items():
                    ideal = flops.ideal_prefill_speedup(config, plan, context, context)
                    rows.append(_row("forward", label, plan, times, dtype, batch, context, sp.repeats, ideal))
            if sp.decode_steps:
                batch = max(sp.batches)
                times = speed.time_decode(model, methods, windows(batch, sp.decode_context), steps=sp.decode_steps,
                                          repeats=sp.repeats, warmup=sp.warmup)
                for label, plan in methods.items():
                    ideal = flops.ideal_decode_speedup(config, plan, sp.decode_context)
                    row = _row("decode", label, plan, times, dtype, batch, sp.decode_context, sp.repeats, ideal)
                    row.tokens_per_s = batch / row.median_s
                    rows.append(row)
            if sp.memory:
                batch, context = max(shapes, key=lambda bc: (bc[0] * bc[1], bc[1]))
                peaks = speed.prefill_peak_memory(model, methods, windows(batch, context))
                for row in rows:
                    if row.kind == "prefill" and row.dtype == dtype and (row.batch, row.context) == (batch, context):
                        label = row.method if row.method == "dense" else f"{row.method}@{row.sparsity:g}"
                        row.peak_mb = peaks[label] / 2**20
                        row.memory_ratio = peaks[label] / peaks["dense"]
    finally:
        model.to(original)
    logger.info("speed: %d rows from %d shapes x %d dtypes", len(rows), len(shapes), len(sp.dtypes))
    return rows


def measure_profile(model: nn.Module, methods: dict[str, Plan | None], sp: SpeedSettings,
                    windows: Callable[[int, int], torch.Tensor]) -> dict[str, list[dict[str, Any]]]:
    """Per-layer profiles of ``dense`` and the first OrthoRank plan (first dtype, batch 1, largest context)."""
    label = next((k for k in methods if k.startswith("orthorank@") and k != "orthorank@0"), None)
    original = next(model.parameters()).dtype
    model.to(torch_dtype(sp.dtypes[0]))
    try:
        ids = windows(1, max(sp.contexts))
        out = {}
        for name in ["dense"] + ([label] if label else []):
            profiles = layer_profile(model, ids, methods[name], repeats=sp.repeats)
            logger.info("profile of %s:\n%s", name, profile_table(profiles))
            out[name] = [p.to_dict() for p in profiles]
        return out
    finally:
        model.to(original)


def run(settings: BenchSettings) -> tuple[BenchResults, Path]:
    """Run the benchmark described by ``settings``; write results under ``settings.out``."""
    s = settings
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    folder = Path(s.out) / (s.name or time.strftime("%Y%m%d-%H%M%S"))
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("results in %s", folder)
    model, tokenizer = embedded.load_model(s.model, dtype=torch_dtype(s.quality_dtype))
    calib_texts, eval_texts = load_texts(s.text)
    calib_ids = token_windows(tokenizer, calib_texts, s.calib_window, s.calib_windows)
    cache = PlanCache(Path(s.out) / "plans", s.model, calib_ids)
    results = BenchResults.start(s, model)
    if s.quality:
        results.quality = measure_quality(model, tokenizer, s, cache, eval_texts)
    if s.speed is not None:
        methods = speed_methods(model, s, s.speed, cache)
        results.plans = {label: p.to_dict() for label, p in methods.items() if p is not None}

        def windows(batch: int, context: int) -> torch.Tensor:
            return token_windows(tokenizer, eval_texts, context, batch)

        results.speed = measure_speed(model, methods, s.speed, windows)
        if s.speed.profile:
            results.profile = measure_profile(model, methods, s.speed, windows)
    results.finish()
    results.write(folder)
    return results, folder
