"""Mask transfer: how much of a domain-adapted model's performance survives pruning with a mask that
was chosen on *other* data?

For each target domain T (a domain the ``shift`` analysis adapted) the dense-LoRA model of T (the
shift's adaptation run, merged) is the 100 % reference. It is pruned, without any retraining or
weight update, with masks from several sources at each sparsity, and evaluated on T's metrics
(``xpert_dist.eval.retention.evaluate``: held-out perplexity and T's tasks); retention is the ratio
to the dense reference (``retention``).

Mask sources (``--sources``; ``D`` is a domain name, ``self`` = T, ``other`` = every domain that is
neither T nor the shift's reference domain):

- ``before:D``: the *base* model's mask calibrated on D's text, e.g. ``before:general`` = "a mask
  from general text" (what pruning the general model gives);
- ``after:D``: the mask of D's adapted model calibrated on D, e.g. ``after:other`` = "the other
  domain's mask", ``after:self`` = T's own one-shot mask (LoRA, then prune);
- ``run:own``: the mask of T's EfficientXpert run (``--own-run T=RUN_DIR``, its ``masks.safetensors``);
  ``run:PATH``: any run's masks.

The shift's cached statistics and models are reused; masks, evaluations and the dense reference
are cached under ``<out>/cache`` so a rerun only evaluates what is missing.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import EvalConfig, RunConfig
from ..errors import ConfigError
from ..eval.retention import retention
from ..prune.maskstore import pack_mask, unpack_mask
from ..prune.pruner import mask_sha256
from ..report import plots as rplots
from ..report.results import atomic_write_text, fmt_value, md_table
from ..utils.atomic import atomic_write_json
from . import metrics as M
from .shift import BUILTIN_DOMAINS, _key, _sp, compute_masks, load_shift

log = logging.getLogger(__name__)

DEFAULT_TASKS = {"health": ["pubmedqa"], "legal": ["casehold"], "general": []}


@dataclass
class TransferConfig:
    shift_dir: str
    out_dir: str
    targets: list[str] | None = None  # None: the adapted domains other than the reference domain
    sparsities: list[float] | None = None  # None: the shift's
    sources: list[str] = field(default_factory=lambda: ["before:general", "after:other", "after:self", "run:own"])
    own_runs: dict[str, str] = field(default_factory=dict)
    tasks: str | None = None  # "health=pubmedqa,legal=casehold" | "none" | None (defaults per builtin domain)
    perplexity_windows: int = 8
    perplexity_seq_len: int = 256
    max_task_examples: int = 40
    eval_batch_size: int = 8
    progress: bool = True


def parse_tasks(text: str | None, targets: list[str]) -> dict[str, list[str]]:
    if text is None:
        return {t: list(DEFAULT_TASKS.get(t, [])) for t in targets}
    if text.strip().lower() == "none":
        return {t: [] for t in targets}
    out = {t: [] for t in targets}
    for item in text.split(","):
        if not item.strip():
            continue
        dom, sep, task = item.partition("=")
        if not sep:
            raise ConfigError(f"transfer --tasks expects DOMAIN=task items, got {item!r}")
        out.setdefault(dom.strip(), []).append(task.strip())
    return out


def pack_masks(masks: dict[str, torch.Tensor]) -> dict:
    """The masks in the MaskStore's packed layout, as tensors ``torch.save`` can cache."""
    return {n: {"shape": list(m.shape), "bits": torch.from_numpy(pack_mask(m)[0])} for n, m in masks.items()}


def unpack_masks(packed: dict) -> dict[str, torch.Tensor]:
    return {n: unpack_mask(v["bits"].numpy(), tuple(v["shape"])) for n, v in packed.items()}


def apply_masks(model, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Zero the pruned weights of ``model`` in place; returns each matrix's fraction of zeros."""
    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for name, keep in masks.items():
            if name not in modules:
                raise ConfigError(f"mask for {name} does not match any module of the model")
            W = modules[name].weight
            if tuple(W.shape) != tuple(keep.shape):
                raise ConfigError(f"mask for {name} has shape {tuple(keep.shape)}, weight {tuple(W.shape)}")
            W.mul_(keep.to(W.dtype))
            out[name] = float((W == 0).sum()) / W.numel()
    return out


class Transfer:
    def __init__(self, cfg: TransferConfig):
        self.cfg = cfg
        self.shift_result, self.shift = load_shift(cfg.shift_dir)
        sc = self.shift.cfg
        self.domains = {d.name: d for d in sc.domains}
        adapted = [d.name for d in sc.adapted()]
        if not adapted:
            raise ConfigError(f"shift in {cfg.shift_dir} adapted no domain (adapt_steps=0): nothing to transfer to")
        self.targets = cfg.targets or [n for n in adapted if n != sc.reference_domain] or adapted
        bad = [t for t in self.targets if t not in adapted]
        if bad:
            raise ConfigError(f"transfer targets {bad} were not adapted by the shift analysis (adapted: {adapted})")
        self.sparsities = [float(s) for s in (cfg.sparsities or sc.sparsities)]
        self.tasks = parse_tasks(cfg.tasks, self.targets)
        self.out = Path(cfg.out_dir)
        self.cache = self.out / "cache"

    # -- sources ----------------------------------------------------------------------
    def expand_sources(self, target: str) -> list[str]:
        """Concrete sources for ``target`` (``self``/``other`` resolved, unavailable ones dropped)."""
        sc = self.shift.cfg
        adapted = {d.name for d in sc.adapted()}
        out = []
        for src in self.cfg.sources:
            kind, _, arg = src.partition(":")
            if kind in ("before", "after"):
                names = ([target] if arg == "self" else
                         [n for n in self.domains if n not in (target, sc.reference_domain)] if arg == "other" else [arg])
                for n in names:
                    if n not in self.domains:
                        raise ConfigError(f"transfer source {src!r}: {n!r} is not a domain of the shift "
                                          f"({', '.join(self.domains)})")
                    if kind == "after" and n not in adapted:
                        log.warning("transfer source %s:%s skipped: %s was not adapted", kind, n, n)
                        continue
                    out.append(f"{kind}:{n}")
            elif kind == "run":
                if arg == "own":
                    if target in self.cfg.own_runs:
                        out.append(f"run:{self.cfg.own_runs[target]}")
                    else:
                        log.warning("transfer source run:own skipped for %s: no --own-run %s=RUN_DIR", target, target)
                else:
                    out.append(src)
            else:
                raise ConfigError(f"transfer source {src!r}: use before:D, after:D, run:own or run:PATH")
        return list(dict.fromkeys(out))

    def describe(self, source: str, target: str) -> str:
        kind, _, arg = source.partition(":")
        if kind == "before":
            return f"base model, {arg} calibration"
        if kind == "after":
            return f"own one-shot mask ({target}-adapted, {target} calibration)" if arg == target \
                else f"{arg}-adapted model's mask"
        path = Path(arg)
        name = path.name
        rp = path / "results.json"
        if rp.is_file():
            cfgd = json.loads(rp.read_text()).get("config", {})
            name = f"{json.loads(rp.read_text()).get('name', name)} ({cfgd.get('prune', {}).get('method', '?')} run)"
        return f"run mask: {name}"

    def masks(self, source: str, sparsity: float) -> dict[str, torch.Tensor]:
        kind, _, arg = source.partition(":")
        if kind == "run":
            from ..train.export import load_masks

            path = Path(arg) / "masks.safetensors"
            if not path.is_file():
                raise ConfigError(f"transfer source {source}: {path} does not exist")
            masks = load_masks(path)
            got = 1.0 - sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
            if abs(got - sparsity) > 0.01:
                raise ConfigError(f"transfer source {source}: its masks have sparsity {got:.3f}, not {sparsity:g} "
                                  "(pass --sparsity matching the run)")
            return masks
        path = self.cache / "masks" / f"{kind}__{arg}__{_sp(sparsity)}.pt"
        key = _key({"stats": self.shift.stats_key(kind, self.domains[arg], None if self.shift.cfg.calibration == "dense"
                                                  else sparsity), "prune": asdict(self.shift.cfg.prune_config(sparsity))})
        if path.is_file():
            blob = torch.load(path, weights_only=False)
            if blob.get("key") == key:
                return unpack_masks(blob["masks"])
        log.info("masks %s at sparsity %g", source, sparsity)
        masks = compute_masks(self.shift, kind, self.domains[arg], sparsity)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        torch.save({"key": key, "masks": pack_masks(masks)}, tmp)
        tmp.replace(path)
        return masks

    # -- evaluation -------------------------------------------------------------------
    def run_config(self, target: str) -> RunConfig:
        d = self.domains[target]
        builtin = d.name in BUILTIN_DOMAINS and d.spec == d.name
        c = self.cfg
        return RunConfig(domain=d.name if builtin else "custom",
                         eval=EvalConfig(perplexity_data=None if builtin else d.spec,
                                         perplexity_windows=c.perplexity_windows,
                                         perplexity_seq_len=c.perplexity_seq_len, tasks=self.tasks.get(target, []),
                                         max_task_examples=c.max_task_examples, batch_size=c.eval_batch_size))

    def evaluate(self, target: str, label: str, masks: dict[str, torch.Tensor] | None) -> dict:
        """Metrics of T's dense adapted model (``masks`` None) or of it pruned with ``masks`` (cached)."""
        from ..eval.retention import evaluate

        ecfg = asdict(self.run_config(target).eval)
        sha = None if masks is None else _key({n: mask_sha256(m) for n, m in sorted(masks.items())})
        key = _key({"adapt": self.shift.adapt_config(self.domains[target]) | {"output_dir": None}, "eval": ecfg,
                    "masks": sha})
        path = self.cache / "eval" / f"{target}__{label}.json"
        if path.is_file():
            blob = json.loads(path.read_text())
            if blob.get("key") == key:
                return blob
        t0 = time.perf_counter()
        model = copy.deepcopy(self.shift.adapted_model(self.domains[target]))
        sparsity = apply_masks(model, masks) if masks is not None else {}
        metrics = evaluate(model, self.shift.tokenizer(), self.run_config(target), progress=self.cfg.progress)
        del model
        zeros = sum(sparsity.values()) / len(sparsity) if sparsity else 0.0
        blob = {"key": key, "metrics": metrics, "mean_sparsity": zeros, "seconds": time.perf_counter() - t0}
        atomic_write_json(path, blob)
        log.info("evaluated %s %s in %.1f s: %s", target, label, blob["seconds"],
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        return blob

    def run(self) -> dict:
        t0 = time.perf_counter()
        rows, dense = [], {}
        jobs = [(t, s, src) for t in self.targets for s in self.sparsities for src in self.expand_sources(t)]
        bar = tqdm(total=len(jobs) + len(self.targets), desc="transfer", disable=not self.cfg.progress)
        for t in self.targets:
            dense[t] = self.evaluate(t, "dense", None)["metrics"]
            bar.update(1)
            for s in self.sparsities:
                own = None
                srcs = self.expand_sources(t)
                if f"after:{t}" in srcs:
                    own = self.masks(f"after:{t}", s)
                for src in srcs:
                    masks = self.masks(src, s)
                    ev = self.evaluate(t, f"{src.replace('/', '_').replace(':', '-')}__{_sp(s)}", masks)
                    iou_own = None
                    if own is not None and set(own) == set(masks):
                        counts = {n: M.overlap_counts(masks[n], own[n]) for n in own}
                        iou_own = M.pooled_iou(counts, "all").get("all")
                    rows.append({"target": t, "sparsity": s, "source": src, "description": self.describe(src, t),
                                 "metrics": ev["metrics"], "retention": retention(ev["metrics"], dense[t]),
                                 "mean_sparsity": ev["mean_sparsity"], "iou_vs_own_one_shot": iou_own,
                                 "eval_seconds": ev["seconds"]})
                    bar.update(1)
        bar.close()
        self.shift.release_models()
        settings = asdict(self.cfg)
        return {"settings": settings, "shift_settings": self.shift_result["settings"], "targets": self.targets,
                "sparsities": self.sparsities, "tasks": self.tasks, "dense": dense, "rows": rows,
                "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- outputs

def _f(v, d=4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def write_transfer_outputs(result: dict, out_dir: str | Path, command: str | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command:
        result = dict(result, command=command)
    atomic_write_json(out_dir / "transfer.json", result)
    metric_keys = list(dict.fromkeys(k for r in result["rows"] for k, v in r["metrics"].items()
                                     if isinstance(v, float) and not k.endswith("_n")))
    ret_keys = ["domain_retention"] + [k for k in dict.fromkeys(k for r in result["rows"] for k in r["retention"])
                                       if k != "domain_retention"]
    lines = [",".join(["target", "sparsity", "source", "mean_sparsity", "iou_vs_own_one_shot"] + metric_keys
                      + [f"retention_{k}" for k in ret_keys])]
    for t, m in result["dense"].items():
        lines.append(",".join([t, "0", "dense", "0", ""] + [str(m.get(k, "")) for k in metric_keys]
                              + ["1.0" for _ in ret_keys]))
    for r in result["rows"]:
        lines.append(",".join([r["target"], f"{r['sparsity']:g}", r["source"], f"{r['mean_sparsity']:.6f}",
                               "" if r["iou_vs_own_one_shot"] is None else f"{r['iou_vs_own_one_shot']:.6f}"]
                              + [str(r["metrics"].get(k, "")) for k in metric_keys]
                              + [str(r["retention"].get(k, "")) for k in ret_keys]))
    atomic_write_text(out_dir / "transfer.csv", "\n".join(lines) + "\n")

    out = ["# Mask transfer: retention of domain-adapted models pruned with other masks", ""]
    if result.get("command"):
        out += ["Command:", "", "```bash", result["command"], "```", ""]
    ss = result["shift_settings"]
    s = result["settings"]
    out += [f"Model `{ss['model'].get('name_or_path') if ss['model'].get('tiny') is None else 'tiny random Llama'}`, "
            f"{ss['method']} scores (group {ss['group']}), masks applied to each domain's dense-LoRA model "
            "(the shift analysis's adaptation run) without retraining. Retention = pruned / dense "
            "(perplexity: dense / pruned); `domain_retention` averages perplexity and each task's `acc`. "
            f"Evaluation: {s['perplexity_windows']} held-out windows x {s['perplexity_seq_len']} tokens"
            + "".join(f"; {t}: {', '.join(ts)} (first {s['max_task_examples']} examples)"
                      for t, ts in result["tasks"].items() if ts) + ".", ""]
    out += ["## Dense references", "",
            md_table(["domain"] + metric_keys, [[t] + [fmt_value(k, m.get(k)) if k in m else "-" for k in metric_keys]
                                                for t, m in result["dense"].items()]), ""]
    out += ["## Retention", ""]
    for t in result["targets"]:
        rs = [r for r in result["rows"] if r["target"] == t]
        if not rs:
            continue
        keys = [k for k in metric_keys if k in result["dense"].get(t, {})]
        rkeys = ["domain_retention"] + [k for k in keys if k in rs[0]["retention"]]
        header = ["sparsity", "mask source", "what", "IoU vs own one-shot"] + \
                 [f"retention {k}" if k == "domain_retention" else f"ret. {k}" for k in rkeys] + keys
        rows = [[f"{r['sparsity']:g}", f"`{r['source']}`", r["description"], _f(r["iou_vs_own_one_shot"], 3)]
                + [_f(r["retention"].get(k)) for k in rkeys]
                + [fmt_value(k, r["metrics"][k]) if k in r["metrics"] else "-" for k in keys] for r in rs]
        out += [f"### {t}", "", md_table(header, rows), ""]
    bars: dict[str, dict[str, float]] = {}
    for r in result["rows"]:
        kind = r["source"] if not r["source"].startswith("run:") else "run:own"
        label = kind.replace(f":{r['target']}", ":self")
        for other in result["targets"]:
            if other != r["target"] and label == f"after:{other}":
                label = "after:other"
        bars.setdefault(label, {})[f"{r['target']} @{r['sparsity']:g}"] = r["retention"].get("domain_retention", math.nan)
    if rplots.plot_retention(bars, out_dir / "transfer_retention.png",
                             title="Domain retention by mask source (1 = dense-LoRA model)"):
        out += ["![retention by mask source](transfer_retention.png)", ""]
    out += ["Files: `transfer.json` (everything), `transfer.csv` (one row per evaluation).", ""]
    page = atomic_write_text(out_dir / "transfer.md", "\n".join(out))
    log.info("wrote %s", page)
    return Path(page)


def run_transfer(cfg: TransferConfig, command: str | None = None) -> dict:
    result = Transfer(cfg).run()
    write_transfer_outputs(result, cfg.out_dir, command)
    return result
