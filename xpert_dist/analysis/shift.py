"""Domain structural shift: do the weights that matter change with the domain and with adaptation?

For one model and several domains (aliases ``general``/``health``/``legal`` or any dataset spec that
``xpert_dist.data.sources.load_records`` reads) this computes pruning scores and masks in two phases:

- ``before``: the base model, calibrated on each domain's text;
- ``after``: the base model after a short dense LoRA adaptation on each domain (the training
  pipeline with ``prune.method=none``; its merged export is the adapted model), calibrated on the
  same domain's text.

and compares them per layer x module type (docs METHOD.md, "Structural-shift analysis"):

- ``domains@before`` / ``domains@after``: every pair of domains within a phase;
- ``adaptation``: before vs after, per domain;
- ``<ref>@before vs after``: the reference domain's *base-model* mask (general text by default)
  against each other domain's adapted mask (the paper's "general mask is misaligned" claim);

with two measures: IoU of the kept sets (per sparsity) and Spearman rank correlation of the scores.
Mask movement between prune steps of existing runs (their ``results.json`` prune reports) is
added when run directories are given.

Statistics: ``calibration="dense"`` (default) collects diag(XᵀX) from full forwards of the dense
model, so scores do not depend on the sparsity (one set of scores, masks at every sparsity);
``"sequential"`` runs the library's Pruner (final step: no EMA, no PBS) per sparsity, so block i is
scored on inputs that went through the *pruned* blocks 0..i-1, exactly as the pipeline's final
prune step does (several times the cost on CPU). Either way only the per-block diag statistics are
stored; scores and masks are recomputed layer by layer from them with the Pruner's own scoring
(``Pruner._block_scores``) and mask selection (``prune.block.choose_mask``), so memory stays at one
layer of scores per (phase, domain). In sequential mode the recomputed masks are checked against
the Pruner's mask hashes.

Everything expensive is cached under ``<out>/cache`` with a key of the settings it depends on
(calibration windows, adaptation runs, statistics, metric records), so a rerun resumes and a
changed setting recomputes only what depends on it.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ModelConfig, DataConfig, config_from_dict
from ..errors import ConfigError
from ..models import loading, structure as st
from ..prune.block import choose_mask
from ..prune.pruner import mask_sha256
from ..utils.atomic import atomic_write_json
from . import metrics as M
from .shift_scores import RecordingPruner, layer_scores

log = logging.getLogger(__name__)

from .shift_config import (BUILTIN_DOMAINS, PHASES, SCORED_METHODS, Domain, ShiftConfig,  # noqa: F401
                           _key, _sp, config_from_settings, parse_domains)


# ----------------------------------------------------------------------------- the job

class ShiftAnalysis:
    """The cached steps of one shift analysis; ``run()`` does all of them and returns the result dict."""

    def __init__(self, cfg: ShiftConfig):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.cache = self.out / "cache"
        self._tokenizer = None
        self._model_cfg: ModelConfig | None = None
        self._models: dict[str, torch.nn.Module] = {}
        self.timing: dict[str, float] = {}

    # -- model and data ---------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        """The base model's config; a GGUF source is dequantised once into the cache (fast reloads)."""
        if self._model_cfg is not None:
            return self._model_cfg
        m = self.cfg.model
        if m.tiny is None:
            source, gguf = loading.resolve_source(m)
            if gguf:  # the loader's dequantised copy (model.gguf_cache), else one of this analysis' own
                target = loading.gguf_plain_copy(m) or self.cache / "base_model"
                if not (target / "config.json").is_file():
                    log.info("materialising %s/%s as %s (once)", source, gguf, target)
                    loading.save_plain_checkpoint(loading.load_model(m), loading.load_tokenizer(m), target)
                m = dataclasses.replace(m, name_or_path=str(target.resolve()), gguf_file=None)
        self._model_cfg = m
        return m

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = loading.load_tokenizer(self.model_config())
        return self._tokenizer

    def base_model(self):
        if "base" not in self._models:
            self._models["base"] = loading.load_model(self.model_config(), seed=self.cfg.seed)
        return self._models["base"]

    def adapted_model(self, d: Domain):
        key = f"after:{d.name}"
        if key not in self._models:
            from transformers import AutoModelForCausalLM

            path = self.adapt_dir(d) / "model"
            self._models[key] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return self._models[key]

    def model_for(self, phase: str, d: Domain):
        return self.base_model() if phase == "before" else self.adapted_model(d)

    def release_models(self) -> None:
        self._models.clear()

    def _model_id(self) -> dict:
        return asdict(self.cfg.model)

    def calib_key(self, d: Domain) -> dict:
        c = self.cfg
        return {"model": self._model_id(), "spec": d.spec, "text_field": c.text_field, "n": c.calib_samples,
                "len": c.calib_seq_len, "seed": c.seed}

    def calibration_ids(self, d: Domain) -> torch.Tensor:
        """Seeded calibration windows of the domain's text (cached)."""
        from ..data import sources, tokenize

        path = self.cache / "calib" / f"{d.name}.pt"
        key = _key(self.calib_key(d))
        if path.is_file():
            blob = torch.load(path, weights_only=True)
            if blob.get("key") == key:
                return blob["ids"]
        c = self.cfg
        texts = sources.texts_of(sources.load_records(d.spec), DataConfig(text_field=c.text_field))
        ids = tokenize.calibration_batch(texts, self.tokenizer(), c.calib_samples, c.calib_seq_len, c.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "ids": ids}, path)
        log.info("calibration %s: %d x %d tokens from %s", d.name, ids.shape[0], ids.shape[1], d.spec)
        return ids

    # -- adaptation -------------------------------------------------------------------
    def adapt_dir(self, d: Domain) -> Path:
        return self.cache / "adapt" / d.name

    def adapt_config(self, d: Domain) -> dict:
        c = self.cfg
        m = self.model_config()
        domain = d.name if d.name in BUILTIN_DOMAINS and d.spec == d.name else "custom"
        return {
            "name": f"adapt_{d.name}", "output_dir": str(self.adapt_dir(d)), "domain": domain,
            "model": asdict(m), "lora": asdict(c.lora),
            "data": {"train": d.spec, "seq_len": c.adapt_seq_len, "max_train_samples": c.adapt_max_train_samples,
                     "calib_samples": 1, "text_field": c.text_field, "seed": c.seed},
            "prune": {"method": "none"},
            "train": {"max_steps": c.adapt_steps, "epochs": 1000, "batch_size": c.adapt_batch_size,
                      "lr": c.adapt_lr, "seed": c.seed, "log_every": max(1, c.adapt_steps // 5)},
            "eval": {"perplexity_windows": 0, "tasks": []},
        }

    def adapt(self, d: Domain) -> dict:
        """Dense LoRA adaptation on the domain (the pipeline, method none); cached by its config."""
        run_cfg = self.adapt_config(d)
        key = _key({k: v for k, v in run_cfg.items() if k != "output_dir"} | {"model_id": self._model_id()})
        out = self.adapt_dir(d)
        stamp = out / "shift_key.json"
        if (out / "results.json").is_file() and (out / "model").is_dir() and stamp.is_file() \
                and json.loads(stamp.read_text()).get("key") == key:
            return json.loads((out / "results.json").read_text())
        if out.exists():
            log.info("adaptation %s: settings changed or incomplete, redoing it", d.name)
            shutil.rmtree(out)
        from ..train import pipeline

        log.info("adaptation %s: %d LoRA steps (batch %d x %d tokens) on %s", d.name, self.cfg.adapt_steps,
                 self.cfg.adapt_batch_size, self.cfg.adapt_seq_len, d.spec)
        res = pipeline.run(config_from_dict(run_cfg), progress=self.cfg.progress)
        atomic_write_json(stamp, {"key": key})
        return res

    # -- statistics -------------------------------------------------------------------
    def stats_key(self, phase: str, d: Domain, sparsity: float | None) -> dict:
        key = {"calib": self.calib_key(d), "phase": phase, "mode": self.cfg.calibration,
               "batch_size": self.cfg.batch_size}
        if phase == "after":
            key["adapt"] = self.adapt_config(d) | {"output_dir": None}
        if sparsity is not None:
            key["prune"] = asdict(self.cfg.prune_config(sparsity))
        return key

    def stats_path(self, phase: str, d: Domain, sparsity: float | None) -> Path:
        suffix = f"__{_sp(sparsity)}" if sparsity is not None else ""
        return self.cache / "stats" / f"{phase}__{d.name}{suffix}.pt"

    def stats(self, phase: str, d: Domain, sparsity: float | None) -> dict:
        """``{"layers": {i: {group: (diag, n)}}, "mask_sha256": {...}}`` of one (phase, domain[, sparsity])."""
        path = self.stats_path(phase, d, sparsity)
        key = _key(self.stats_key(phase, d, sparsity))
        if path.is_file():
            blob = torch.load(path, weights_only=False)
            if blob.get("key") == key:
                return blob
        t0 = time.perf_counter()
        model = self.model_for(phase, d)
        ids = self.calibration_ids(d)
        blob = {"key": key, "layers": {}, "mask_sha256": {}}
        if self.cfg.method == "magnitude":
            pass  # data-free: no statistics
        elif sparsity is None:
            from ..stats.sequential import full_forward_stats

            log.info("statistics %s:%s (dense forwards, %d windows)", phase, d.name, ids.shape[0])
            raw = full_forward_stats(model, ids, mode="diag", batch_size=self.cfg.batch_size)
            blob["layers"] = {i: {g: (s.diag.detach().cpu().clone(), s.n) for g, s in groups.items()}
                              for i, groups in raw.items()}
        else:
            log.info("statistics %s:%s at sparsity %g (sequential prune step)", phase, d.name, sparsity)
            rec = RecordingPruner(self.cfg.prune_config(sparsity), batch_size=self.cfg.batch_size,
                                   progress=self.cfg.progress)
            report = rec.step(copy.deepcopy(model), ids, float(sparsity), final=True)
            blob["layers"] = rec.recorded
            blob["mask_sha256"] = dict(report.mask_sha256)
        blob["seconds"] = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        torch.save(blob, tmp)
        tmp.replace(path)
        return blob

    # -- scores, masks, metrics -----------------------------------------------------------
    def sets(self) -> list[tuple[str, Domain]]:
        return [("before", d) for d in self.cfg.domains] + [("after", d) for d in self.cfg.adapted()]

    def comparisons(self) -> list[tuple[str, str, str]]:
        """``(comparison, set a, set b)`` with sets named ``phase:domain``."""
        names = [d.name for d in self.cfg.domains]
        adapted = [d.name for d in self.cfg.adapted()]
        out = [("domains@before", f"before:{a}", f"before:{b}") for a, b in itertools.combinations(names, 2)]
        out += [("domains@after", f"after:{a}", f"after:{b}") for a, b in itertools.combinations(adapted, 2)]
        out += [("adaptation", f"before:{n}", f"after:{n}") for n in adapted]
        ref = self.cfg.reference_domain
        if ref in names:
            out += [(f"{ref}@before vs after", f"before:{ref}", f"after:{n}") for n in adapted if n != ref]
        return out

    def records_key(self) -> dict:
        c = self.cfg
        return {"stats": {f"{p}:{d.name}": self.stats_key(p, d, None) for p, d in self.sets()},
                "sparsities": [float(s) for s in c.sparsities], "method": c.method, "group": c.group,
                "variant": c.variant, "comparisons": self.comparisons(), "version": 1}

    def compute_records(self) -> list[dict]:
        """Per-matrix metric records for every comparison (cached)."""
        path = self.cache / "records.json"
        key = _key(self.records_key())
        if path.is_file():
            blob = json.loads(path.read_text())
            if blob.get("key") == key:
                return blob["records"]
        c = self.cfg
        sets = {f"{p}:{d.name}": (p, d) for p, d in self.sets()}
        comps = self.comparisons()
        needed = sorted({s for _, a, b in comps for s in (a, b)})
        groups = [None] if c.calibration == "dense" else [float(s) for s in c.sparsities]
        records: list[dict] = []
        for sp_group in groups:
            stats = {name: self.stats(*sets[name], sp_group) for name in needed}
            n_layers = len(st.blocks(self.base_model()))
            sparsities = [float(s) for s in c.sparsities] if sp_group is None else [sp_group]
            desc = "shift metrics" + (f" @{sp_group:g}" if sp_group is not None else "")
            for i in tqdm(range(n_layers), desc=desc, disable=not c.progress):
                scores = {name: layer_scores(self.model_for(*sets[name]), i, stats[name]["layers"].get(i),
                                             c.prune_config(sparsities[0])) for name in needed}
                for full in scores[needed[0]]:
                    ranks = {name: M.average_ranks(scores[name][full]) for name in needed}
                    masks = {(name, s): choose_mask(c.prune_config(s), scores[name][full], s)
                             for name in needed for s in sparsities}
                    if sp_group is not None:  # check against the Pruner's own masks
                        for name in needed:
                            want = stats[name]["mask_sha256"].get(full)
                            if want is not None and mask_sha256(masks[(name, sp_group)]) != want:
                                raise RuntimeError(f"recomputed mask of {full} ({name}) differs from the Pruner's")
                    parsed = M.parse_module(full)
                    base = {"name": full, "layer": parsed[0], "module": parsed[1],
                            "numel": int(scores[needed[0]][full].numel())}
                    for comp, a, b in comps:
                        records.append(base | {"metric": "spearman", "comparison": comp, "a": a, "b": b,
                                               "sparsity": sp_group,
                                               "value": M.spearman_from_ranks(ranks[a], ranks[b])})
                        for s in sparsities:
                            inter, union = M.overlap_counts(masks[(a, s)], masks[(b, s)])
                            records.append(base | {"metric": "iou", "comparison": comp, "a": a, "b": b,
                                                   "sparsity": s, "value": 1.0 if union == 0 else inter / union,
                                                   "inter": inter, "union": union})
        atomic_write_json(path, {"key": key, "records": records})
        return records

    # -- movement from runs -----------------------------------------------------------
    def movement(self) -> dict:
        from ..report.results import load_results

        out = {}
        for run in self.cfg.runs:
            res = load_results(run)
            steps = M.movement_from_reports(res.get("prune_reports") or [])
            out[res["name"]] = {"run_dir": str(run), "steps": [
                {"step": s["step"], "final": s["final"], "overall": M.aggregate(s["moved"], "all").get("all"),
                 "by_layer": M.aggregate(s["moved"], "layer"), "by_module": M.aggregate(s["moved"], "module"),
                 "per_matrix": s["moved"]} for s in steps]}
            if not steps:
                log.warning("run %s has no prune step with mask movement (needs >= 2 prune steps)", run)
        return out

    # -- everything ---------------------------------------------------------------------
    def run(self) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        steps = [("calibration", lambda: [self.calibration_ids(d) for d in c.domains])]
        adapt_results = {}
        if c.adapted():
            def do_adapt():
                for d in c.adapted():
                    adapt_results[d.name] = self.adapt(d)
            steps.append(("adaptation", do_adapt))
        records: list[dict] = []

        def do_stats():
            groups = [None] if c.calibration == "dense" else [float(s) for s in c.sparsities]
            for g in groups:
                for p, d in self.sets():
                    self.stats(p, d, g)

        def do_records():
            records.extend(self.compute_records())

        steps += [("statistics", do_stats), ("metrics", do_records)]
        for name, fn in tqdm(steps, desc="shift analysis", disable=not c.progress):
            t = time.perf_counter()
            fn()
            self.timing[f"{name}_s"] = time.perf_counter() - t
            log.info("shift analysis: %s done (%.1f s)", name, self.timing[f"{name}_s"])
        self.release_models()
        result = summarise(records, c, self.comparisons())
        result["movement"] = self.movement()
        result["adaptation"] = {n: {"run_dir": str(self.adapt_dir(d)), "loss_history": r.get("loss_history", []),
                                    "final_loss": r.get("final_loss"), "timing": r.get("timing", {})}
                                for d in c.domains for n, r in [(d.name, adapt_results.get(d.name, {}))] if r}
        self.timing["total_s"] = time.perf_counter() - t0
        result["timing"] = dict(self.timing)
        return result


# ----------------------------------------------------------------------------- summary

def _pair(a: str, b: str) -> str:
    return f"{a} | {b}"


def summarise(records: list[dict], cfg: ShiftConfig, comparisons: list[tuple[str, str, str]]) -> dict:
    """Aggregate per-matrix records: per comparison, pair, metric and sparsity the overall value
    (pooled IoU / mean Spearman over matrices), per layer, per module type and per matrix."""
    settings = asdict(cfg)
    settings["domains"] = [asdict(d) for d in cfg.domains]
    out = {"settings": settings, "comparisons": [list(c) for c in comparisons],
           "random_iou": {f"{s:g}": M.random_iou(s) for s in cfg.sparsities}, "results": []}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["comparison"], r["a"], r["b"], r["metric"], r["sparsity"]), []).append(r)
    for (comp, a, b, metric, sp), recs in groups.items():
        values = {r["name"]: r["value"] for r in recs}
        if metric == "iou":
            counts = {r["name"]: (r["inter"], r["union"]) for r in recs}
            agg = {by: M.pooled_iou(counts, by) for by in M.BY}
        else:
            agg = {by: M.aggregate(values, by) for by in M.BY}
        out["results"].append({"comparison": comp, "a": a, "b": b, "pair": _pair(a, b), "metric": metric,
                               "sparsity": sp, "overall": agg["all"].get("all", math.nan),
                               "by_layer": {str(k): v for k, v in agg["layer"].items()},
                               "by_module": agg["module"], "per_matrix": values})
    return out


def run_shift(cfg: ShiftConfig, command: str | None = None) -> dict:
    """Run (or resume) the analysis and write ``shift.json``, CSVs, PNGs and ``shift.md`` into ``cfg.out_dir``."""
    from .shift_report import write_shift_outputs

    result = ShiftAnalysis(cfg).run()
    if command:
        result["command"] = command
    write_shift_outputs(result, cfg.out_dir)
    return result


def load_shift(shift_dir: str | Path) -> tuple[dict, ShiftAnalysis]:
    """(stored result, an analysis object over its cache) of a finished ``shift`` output directory."""
    path = Path(shift_dir) / "shift.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `analyze.py shift --out {shift_dir}` first")
    result = json.loads(path.read_text())
    cfg = config_from_settings(result["settings"], shift_dir)
    cfg.progress = False
    return result, ShiftAnalysis(cfg)


def compute_masks(analysis: ShiftAnalysis, phase: str, d: Domain, sparsity: float) -> dict[str, torch.Tensor]:
    """Keep masks of every pruned matrix of set ``phase:d`` at ``sparsity`` (from its cached statistics)."""
    c = analysis.cfg
    group = None if c.calibration == "dense" else float(sparsity)
    stats = analysis.stats(phase, d, group)
    model = analysis.model_for(phase, d)
    pcfg = c.prune_config(sparsity)
    out = {}
    for i in range(len(st.blocks(model))):
        for name, score in layer_scores(model, i, stats["layers"].get(i), pcfg).items():
            out[name] = choose_mask(pcfg, score, float(sparsity))
    return out
