"""Logits and greedy tokens of every public entry point on the embedded model, and the comparison
of two such records.

    python -m benchmarks.experiments.entrypoints_check --out entrypoints.pt
    python -m benchmarks.experiments.entrypoints_check --compare before.pt after.pt

Each case installs something on the embedded SmolLM2-135M (bfloat16, 2 threads) and records the
full logits of one wiki window, the greedy tokens and step logits of a 16-token ``generate`` from
it, and the installed plan. Plans for ``sparsity=`` must come from the shipped plans: a case that
would calibrate one fails instead (a calibration takes minutes), so ``max_ppl_increase=`` (a search
to sparsity 0.5, beyond the shipped plans) is not among the cases.

``analysis.sink_profile`` is recorded with ``keep_recent=0`` (a selection by score alone, what the
analysis measured before it took ``keep_recent``) and with its default (``keep_recent=32``, as
``orthorank.patch``); ``--compare`` reports cases present in one record only.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import orthorank
from orthorank import baselines, selfcalib
from orthorank.analysis import sink_profile
from orthorank.text import token_windows

from benchmarks.embedded import load_model, wiki_texts

logger = logging.getLogger(__name__)

PLANS = Path(__file__).resolve().parents[1] / "results" / "plans"
SAVED_PLAN = PLANS / "selfcalib@0.2.json"
SHIPPED_PLAN = PLANS / "shipped" / "shipped@0.3.json"
WINDOW = 256
NEW_TOKENS = 16
LAYERS = [10, 13, 16, 19]

Record = dict[str, Any]


@contextlib.contextmanager
def no_calibration() -> Iterator[None]:
    """``patch(sparsity=...)`` may use shipped plans only: a self-calibration raises."""
    original = selfcalib.auto_calibrate

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this case would calibrate a plan")

    selfcalib.auto_calibrate = refuse
    try:
        yield
    finally:
        selfcalib.auto_calibrate = original


def cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def measure(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, pad: int, cache: Any = None) -> Record:
    """Full logits of ``ids``, then greedy tokens and step logits of a generation from ``ids``."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    extra = {} if cache is None else {cache_kwarg(model): cache}
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=NEW_TOKENS,
        do_sample=False, pad_token_id=pad, output_logits=True, return_dict_in_generate=True, **extra,
    )
    return {
        "logits": logits.detach().clone(),
        "tokens": out.sequences[:, ids.shape[1]:].clone(),
        "step_logits": torch.stack(out.logits, dim=1).detach().clone(),
        "plan": plan_view(orthorank.get_plan(model)),
    }


def plan_view(plan: orthorank.Plan | None) -> dict[str, Any] | None:
    return None if plan is None else {"keep_ratios": list(plan.keep_ratios), "selector": plan.selector, "method": plan.method}


def cases(model: nn.Module, tok: Any) -> dict[str, Callable[[], Record]]:
    texts = wiki_texts("eval")
    ids = token_windows(tok, texts, WINDOW, 2)
    one = ids[:1]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    short = 180
    batch = ids.clone()
    batch[1, : WINDOW - short] = pad
    mask = torch.ones_like(batch)
    mask[1, : WINDOW - short] = 0
    calib = token_windows(tok, wiki_texts("calib"), 64, 2)

    def run(mask_: torch.Tensor | None = None, ids_: torch.Tensor = one, cache: Any = None) -> Record:
        return measure(model, ids_, mask_, pad, cache)

    @contextlib.contextmanager
    def installed(**kwargs: Any) -> Iterator[None]:
        """``orthorank.patch(model, **kwargs)`` inside the block (nothing without ``kwargs``); dense after."""
        if kwargs:
            with no_calibration():
                orthorank.patch(model, progress=False, **kwargs)
        try:
            yield
        finally:
            orthorank.unpatch(model)

    def patched_with(**kwargs: Any) -> Callable[[], Record]:
        def case() -> Record:
            with installed(**kwargs):
                return run()
        return case

    def patched_ctx() -> Record:
        with no_calibration(), orthorank.patched(model, sparsity=0.2, progress=False):
            inside = run()
        after = run()
        inside["after_exit"] = after
        return inside

    def unpatched() -> Record:
        with installed(sparsity=0.2):
            pass
        return run()

    def layer_stats() -> Record:
        with installed(sparsity=0.2), torch.inference_mode():
            model(input_ids=one)
            stats = {i: vars(s).copy() for i, s in orthorank.layer_stats(model).items()}
            return {"stats": stats, "is_patched": orthorank.is_patched(model)}

    def padded(**kwargs: Any) -> Callable[[], Record]:
        def case() -> Record:
            with installed(**kwargs):
                return run(mask, batch)
        return case

    def budget(**kwargs: Any) -> Callable[[], Record]:
        def case() -> Record:
            with installed(**kwargs):
                return run(cache=orthorank.BudgetCache(model, budget=64, policy="attention"))
        return case

    def planned(make: Callable[[], orthorank.Plan]) -> Callable[[], Record]:
        def case() -> Record:
            with installed(plan=make()):
                return run()
        return case

    def self_generated() -> Record:
        with installed(sparsity=0.2):
            return {"tokens": selfcalib.self_generated_ids(model, 2, 16, seed=0)}

    def analysis(**kwargs: Any) -> Callable[[], Record]:
        def case() -> Record:
            profile = sink_profile(model, tok, texts[:4], max_tokens=96, batch_size=2, attention=True, **kwargs)
            return {"profile": {k: v for k, v in profile.to_dict().items() if k != "keep_recent"}}
        return case

    return {
        "dense": run,
        "patch(sparsity=0.2)": patched_with(sparsity=0.2),
        "patch(sparsity=0.1)": patched_with(sparsity=0.1),
        "patch(sparsity=0.3)": patched_with(sparsity=0.3),
        "patch(layers=..., keep_ratio=0.5)": patched_with(layers=LAYERS, keep_ratio=0.5),
        "patch(plan=saved selfcalib@0.2)": patched_with(plan=orthorank.Plan.load(SAVED_PLAN)),
        "patch(plan=shipped@0.3)": patched_with(plan=orthorank.Plan.load(SHIPPED_PLAN)),
        "patched(sparsity=0.2)": patched_ctx,
        "patch + unpatch": unpatched,
        "decode='bypass'": patched_with(sparsity=0.2, decode="bypass"),
        "selector='random'": patched_with(layers=LAYERS, selector="random"),
        "selector='least_orthogonal'": patched_with(layers=LAYERS, selector="least_orthogonal"),
        "keep_recent=0": patched_with(sparsity=0.2, keep_recent=0),
        "keep_recent=1": patched_with(sparsity=0.2, keep_recent=1),
        "layer_stats": layer_stats,
        "padded batch of 2, dense": padded(),
        "padded batch of 2, sparsity=0.2": padded(sparsity=0.2),
        "BudgetCache(64, attention), dense": budget(),
        "BudgetCache(64, attention), sparsity=0.2": budget(sparsity=0.2),
        "sleb_plan(0.1, 2x64)": planned(lambda: baselines.sleb_plan(model, calib, 0.1, progress=False)),
        "shortgpt_plan(0.1, 2x64)": planned(lambda: baselines.shortgpt_plan(model, calib, 0.1)),
        "calibrate(0.1, 2x64)": planned(lambda: orthorank.calibrate(model, None, calib, 0.1, progress=False)),
        "self_generated_ids (patched model)": self_generated,
        "analysis.sink_profile": analysis(keep_recent=0),
        "analysis.sink_profile (keep_recent=32)": analysis(),
    }


def record_all(out: Path) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load_model(dtype=torch.bfloat16)
    records: dict[str, Record] = {}
    for name, case in cases(model, tok).items():
        logger.info("case %s", name)
        records[name] = case()
        assert not orthorank.is_patched(model), name
    torch.save(records, out)
    print(f"{len(records)} cases written to {out}")


def max_diff(a: Any, b: Any) -> float | None:
    """Largest absolute difference between two records' tensors/values (``None``: nothing numeric)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return float("inf")
        found = [d for k in a if (d := max_diff(a[k], b[k])) is not None]
        return max(found) if found else None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        found = [d for x, y in zip(a, b) if (d := max_diff(x, y)) is not None]
        return max(found) if found else None
    if isinstance(a, float) and isinstance(b, float):
        if a != a and b != b:  # both NaN
            return 0.0
        return abs(a - b)
    return 0.0 if a == b else float("inf")


def compare(before: Path, after: Path) -> int:
    old, new = torch.load(before, weights_only=False), torch.load(after, weights_only=False)
    print("| entry point | max abs logit diff | greedy tokens identical | step-logit max diff | plan identical | other |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for name in new.keys() - old.keys():
        print(f"| {name} | only in {after.name} | | | | |")
    for name, rec in old.items():
        other = new.get(name)
        if other is None:
            print(f"| {name} | missing | | | | |")
            bad += 1
            continue
        logits = max_diff(rec.get("logits"), other.get("logits")) if "logits" in rec else None
        tokens = torch.equal(rec["tokens"], other["tokens"]) if "tokens" in rec else None
        steps = max_diff(rec.get("step_logits"), other.get("step_logits")) if "step_logits" in rec else None
        plan = rec.get("plan") == other.get("plan") if "plan" in rec else None
        rest = {k: max_diff(v, other.get(k)) for k, v in rec.items() if k not in ("logits", "tokens", "step_logits", "plan")}
        bad += int(bool(logits) or tokens is False or bool(steps) or plan is False or any(rest.values()))
        print(f"| {name} | {'-' if logits is None else f'{logits:.3g}'} | {'-' if tokens is None else tokens} | "
              f"{'-' if steps is None else f'{steps:.3g}'} | {'-' if plan is None else plan} | "
              f"{', '.join(f'{k}: {v:.3g}' for k, v in rest.items() if v is not None) or '-'} |")
    print(f"\n{len(old) - bad} of {len(old)} cases identical")
    return 0 if bad == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="record every entry point into this file")
    group.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"), help="compare two records")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.compare:
        return compare(*args.compare)
    record_all(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
