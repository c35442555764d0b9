"""The user's plan cache: plans that :func:`orthorank.patch` calibrated, one JSON file each.

Layout (under :func:`cache_root`, i.e. ``$ORTHORANK_CACHE`` or ``~/.cache/orthorank``)::

    plans/<fingerprint>/s<sparsity>_k<keep ratio>_<selector>_<recipe key>.json

e.g. ``plans/75862926133233e0/s0.2000_k0.3333_orthogonal_1a2b3c4d5e.json``. Each file is a
:meth:`orthorank.Plan.to_dict` with two more top-level keys: ``fingerprint`` (of the model, see
:func:`orthorank.fingerprint.model_fingerprint`) and ``request`` (the sparsity, keep ratio,
selector and recipe key it was made for).

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so
processes calibrating at once never leave a partial file: the last writer wins and every reader
sees a whole plan. A file that is unreadable, not JSON, not an orthorank plan, made for another
fingerprint or layer count, or for another request is ignored with a logged warning (and
rebuilt by the caller, which overwrites it). A cache folder that cannot be written only costs
the caching, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from .plan import Plan

logger = logging.getLogger(__name__)

PLANS_DIR = "plans"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$ORTHORANK_CACHE``, else ``~/.cache/orthorank``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ORTHORANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "orthorank"


def plans_root(cache_dir: str | Path | None = None) -> Path:
    """``<cache root>/plans``."""
    return cache_root(cache_dir) / PLANS_DIR


def request_dict(sparsity: float, keep_ratio: float, selector: str, key: str) -> dict[str, Any]:
    return {"sparsity": round(sparsity, 4), "keep_ratio": round(keep_ratio, 4), "selector": selector, "search": key}


def plan_path(
    fingerprint: str, sparsity: float, keep_ratio: float, selector: str, key: str, *, cache_dir: str | Path | None = None
) -> Path:
    """Where the plan for this (model, sparsity, keep ratio, selector, search settings) is cached."""
    return plans_root(cache_dir) / fingerprint / f"s{sparsity:.4f}_k{keep_ratio:.4f}_{selector}_{key}.json"


def _same_request(found: Any, wanted: dict[str, Any]) -> bool:
    """Whether a file's ``request`` matches ``wanted`` (whose ``sparsity`` may be ``None``: any)."""
    if not isinstance(found, dict):
        return False
    return all(found.get(k) == v for k, v in wanted.items() if not (k == "sparsity" and v is None))


def read_plan(path: Path, fingerprint: str, num_layers: int, model_type: str | None, request: dict[str, Any]) -> Plan | None:
    """The plan cached at ``path``, or ``None`` (missing; or bad, with a warning).

    ``request`` is what the file must have been made for (see :func:`request_dict`; a ``None``
    sparsity accepts any).
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        plan = Plan.from_dict(data)
        if data.get("fingerprint") != fingerprint:
            raise ValueError(f"it belongs to model fingerprint {data.get('fingerprint')!r}, not {fingerprint!r}")
        if not _same_request(data.get("request"), request):
            raise ValueError(f"it was made for {data.get('request')!r}, not {request!r}")
        plan.check_model(num_layers, model_type)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        logger.warning("orthorank: ignoring the cached plan %s (%s); it will be rebuilt", path, err)
        return None
    logger.info("orthorank: plan read from the cache %s", path)
    return plan


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temporary file in the same folder + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_plan(path: Path, plan: Plan, fingerprint: str, request: dict[str, Any]) -> bool:
    """Write ``plan`` to ``path`` atomically; ``False`` (with a warning) if the cache is not writable."""
    data = {**plan.to_dict(), "fingerprint": fingerprint, "request": request}
    try:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    except OSError as err:
        logger.warning("orthorank: could not cache the plan in %s (%s)", path, err)
        return False
    logger.info("orthorank: plan cached in %s", path)
    return True


def cached_searches(fingerprint: str, keep_ratio: float, selector: str, key: str, *, cache_dir: str | Path | None = None) -> list[Path]:
    """Cached plans of this model with this keep ratio, selector and search settings (any sparsity)."""
    folder = plans_root(cache_dir) / fingerprint
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"s*_k{keep_ratio:.4f}_{selector}_{key}.json"))
