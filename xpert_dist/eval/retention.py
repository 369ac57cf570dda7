"""Domain evaluation of a model and the retention metric (see docs METHOD.md, "Evaluation").

``evaluate`` returns a flat metrics dict: ``perplexity`` on the domain's held-out text and, per task,
``<task>_acc``, ``<task>_acc_norm``, ``<task>_n``. ``retention`` compares such a dict with the dense-LoRA
model's: perplexity retention = dense / pruned, accuracy retention = pruned / dense, and
``domain_retention`` = the mean over the domain's metrics: perplexity and each task's ``acc``
(``acc_norm`` ratios are reported too, but not averaged, so each task counts once).
"""
from __future__ import annotations

import logging
import math
import time

from ..config import RunConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)


def metric_kind(key: str) -> str | None:
    """``lower`` (perplexity: smaller is better), ``higher`` (accuracies) or None (counts, timings...)."""
    k = key.lower()
    if k == "perplexity" or k.endswith(("_perplexity", "_ppl")) or k == "ppl":
        return "lower"
    if k in ("acc", "acc_norm") or k.endswith(("_acc", "_acc_norm")):
        return "higher"
    return None


def is_primary(key: str) -> bool:
    """Metrics averaged into ``domain_retention``: perplexities and plain accuracies (not acc_norm)."""
    kind = metric_kind(key)
    return kind == "lower" or (kind == "higher" and not key.lower().endswith("acc_norm"))


def _ratio(kind: str, value: float, ref: float) -> float:
    num, den = (ref, value) if kind == "lower" else (value, ref)
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return float("nan")
    return num / den


def retention(metrics: dict, dense: dict) -> dict:
    """Per-metric retention of ``metrics`` against ``dense`` plus ``domain_retention`` (NaN if none).

    Only metrics present (and numeric) in both dicts are compared; undefined ratios (dense accuracy 0,
    non-finite values) are NaN and left out of the mean.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        kind = metric_kind(key)
        ref = dense.get(key)
        if kind is None or not isinstance(value, (int, float)) or not isinstance(ref, (int, float)):
            continue
        out[key] = _ratio(kind, float(value), float(ref))
    primary = [v for k, v in out.items() if is_primary(k) and math.isfinite(v)]
    out["domain_retention"] = sum(primary) / len(primary) if primary else float("nan")
    return out


def evaluate(model, tokenizer, cfg: RunConfig, progress: bool = True) -> dict:
    """Perplexity on the domain's held-out text and accuracy on ``cfg.eval.tasks``; returns the metrics dict.

    Held-out text: ``cfg.eval.perplexity_data``, else the ``<domain>_heldout`` alias (domain ``custom`` needs
    ``eval.perplexity_data``). ``eval.perplexity_windows=0`` skips perplexity.
    """
    from ..data.sources import load_records
    from ..data.tokenize import check_seq_len, model_max_positions
    from .multiple_choice import casehold_items, choice_accuracy, pubmedqa_items
    from .perplexity import heldout_windows, perplexity

    e = cfg.eval
    model_max = model_max_positions(model)
    metrics: dict = {}
    spec = e.perplexity_data or (f"{cfg.domain}_heldout" if cfg.domain != "custom" else None)
    if e.perplexity_windows and spec is None:
        raise ConfigError("domain=custom needs eval.perplexity_data (no held-out alias for a custom domain)")
    if e.perplexity_windows:
        check_seq_len(e.perplexity_seq_len, model_max, "eval.perplexity_seq_len")
        t0 = time.perf_counter()
        windows = heldout_windows(spec, tokenizer, e.perplexity_seq_len, e.perplexity_windows,
                                  text_field=cfg.data.text_field if e.perplexity_data else "text")
        log.info("evaluate: perplexity on %s, %d windows x %d tokens", spec, windows.size(0), windows.size(1))
        metrics["perplexity"] = perplexity(model, windows, batch_size=e.batch_size, progress=progress)
        metrics["perplexity_windows"] = int(windows.size(0))
        log.info("evaluate: perplexity %.4f (%.1f s)", metrics["perplexity"], time.perf_counter() - t0)
    else:
        log.info("evaluate: eval.perplexity_windows=0, perplexity skipped")
    builders = {"pubmedqa": pubmedqa_items, "casehold": casehold_items}
    for task in e.tasks:
        if task not in builders:
            raise ConfigError(f"eval.tasks: unknown task {task!r}; known: {', '.join(builders)}")
        t0 = time.perf_counter()
        if e.max_task_examples <= 0:
            raise ConfigError(f"eval.max_task_examples={e.max_task_examples} must be positive to run eval.tasks")
        ds = load_records(task)  # the task names are data aliases of their test sets
        ds = ds.select(range(min(len(ds), e.max_task_examples)))
        items = builders[task](ds)
        log.info("evaluate: %s, %d items, batch %d", task, len(items), e.batch_size)
        res = choice_accuracy(model, tokenizer, items, batch_size=e.batch_size, max_len=model_max,
                              progress=progress)
        metrics.update({f"{task}_{k}": v for k, v in res.items()})
        log.info("evaluate: %s acc %.4f acc_norm %.4f (%.1f s)", task, res["acc"], res["acc_norm"],
                 time.perf_counter() - t0)
    return metrics
