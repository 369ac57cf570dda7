"""References for a run's report: the base model's metrics (cached) and a dense-LoRA run's metrics.

* **base**: the unpruned, un-fine-tuned model of ``cfg.model`` evaluated with the run's evaluation
  settings, once per (model, evaluation settings): the metrics are cached as JSON under
  ``<eval.cache_dir, $XPERT_DIST_CACHE or ~/.cache/xpert_dist>/base_eval/<key>.json``, ``key`` = sha256 of the model
  source (name/path, GGUF file, dtype, quantization, tiny config and seed for random models), the
  domain and every ``eval`` setting that changes the numbers, and the transformers/torch versions.
  ``eval.base_reference=false`` skips it. Concurrent runs needing one entry evaluate it once (a file lock).
* **dense LoRA**: ``eval.reference_run`` (``launchers/run.py --reference RUN_DIR``), a finished
  ``prune.method=none`` run whose ``results.json`` metrics are copied into this run's results.

Retention against either is computed by the report from the stored metrics
(`xpert_dist.eval.retention.retention`).
"""
from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

from ..config import RunConfig
from ..utils.atomic import atomic_write_json
from ..utils.cache import cache_root
from ..utils.jsonfile import read_json

log = logging.getLogger(__name__)


def cache_dir(cfg: RunConfig) -> Path:
    """``eval.cache_dir``, else ``$XPERT_DIST_CACHE``, else ``$XDG_CACHE_HOME/xpert_dist`` (``~/.cache``)."""
    return Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else cache_root()


def base_key_fields(cfg: RunConfig) -> dict:
    """Everything the base model's metrics depend on."""
    m, e = cfg.model, cfg.eval
    fields = {"model": {"name_or_path": m.name_or_path, "gguf_file": m.gguf_file, "dtype": m.dtype,
                        "quantization": m.quantization, "tiny": m.tiny,
                        "seed": cfg.train.seed if m.tiny is not None else None},
              "domain": cfg.domain, "text_field": cfg.data.text_field if e.perplexity_data else "text",
              "eval": {k: getattr(e, k) for k in ("perplexity_data", "perplexity_windows", "perplexity_seq_len",
                                                  "tasks", "max_task_examples", "batch_size")},
              "versions": {p: _version(p) for p in ("torch", "transformers")}}
    path = Path(m.name_or_path)
    if path.exists():  # a local model: its config/weights files' sizes and times say which model it is
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        fields["model"]["files"] = [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]
    return fields


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def base_cache_path(cfg: RunConfig) -> Path:
    key = hashlib.sha256(json.dumps(base_key_fields(cfg), sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir(cfg) / "base_eval" / f"{key}.json"


def _cached(cfg: RunConfig, path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(json.dumps(base_key_fields(cfg), default=str)):
            return stored["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("base model cache %s unreadable: evaluating again", path)
    return None


def base_metrics(cfg: RunConfig, tokenizer) -> dict:
    """``{"metrics": {...}, "cache": path, "cached": bool}`` for the base model of ``cfg``.

    Runs that need the same entry at once (e.g. benchmark cells started together) evaluate it once: the
    first takes an exclusive lock on ``<entry>.lock`` while it evaluates, the others wait for it and then
    read the cache."""
    import fcntl

    path = base_cache_path(cfg)
    metrics = _cached(cfg, path)
    if metrics is not None:
        log.info("base model metrics from the cache %s", path)
        return {"metrics": metrics, "cache": str(path), "cached": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        metrics = _cached(cfg, path)
        if metrics is not None:
            log.info("base model metrics from the cache %s (evaluated by another run meanwhile)", path)
            return {"metrics": metrics, "cache": str(path), "cached": True}
        from ..models.loading import load_model
        from .retention import evaluate

        log.info("evaluating the base model (unpruned, not fine-tuned) once for the report; cached in %s", path)
        model = load_model(cfg.model, seed=cfg.train.seed)
        try:
            metrics = evaluate(model, tokenizer, cfg, progress=False)
        finally:
            del model
            gc.collect()
        atomic_write_json(path, {"key": base_key_fields(cfg), "metrics": metrics})
    return {"metrics": metrics, "cache": str(path), "cached": False}


def dense_lora_reference(run_dir: str | Path) -> dict:
    """``{"run": dir, "name": ..., "method": ..., "metrics": {...}}`` from a finished run's results.json."""
    res = read_json(Path(run_dir) / "results.json", f"eval.reference_run={run_dir}: results file")
    method = (res.get("config") or {}).get("prune", {}).get("method")
    if method not in (None, "none"):
        log.warning("eval.reference_run %s is a prune.method=%s run, not dense LoRA", run_dir, method)
    return {"run": str(Path(run_dir).resolve()), "name": res.get("name"), "method": method,
            "metrics": res.get("metrics") or {}}


def references(cfg: RunConfig, tokenizer) -> dict:
    """The references this run's config asks for (see the module docstring)."""
    out = {}
    if cfg.eval.base_reference:
        out["base"] = base_metrics(cfg, tokenizer)
    if cfg.eval.reference_run:
        out["dense_lora"] = dense_lora_reference(cfg.eval.reference_run)
    return out
