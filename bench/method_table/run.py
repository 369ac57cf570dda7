#!/usr/bin/env python
"""The EfficientXpert method table on SmolLM2-135M: every baseline and variant, side by side.

    python bench/method_table/run.py [--domains health,legal] [--sparsities 0.4,0.5] [--only NAME,...]
    python bench/method_table/run.py --report     # the table from the finished cells, nothing launched
    python bench/method_table/run.py --threads 1 --only ...   # two invocations side by side on 2 cores
    python bench/method_table/run.py --budget 300 --only dense_lora,xpert_default,...   # another budget's table

Each cell (domain × sparsity × method) is one run of ``launchers/run.py`` in its own process (so
its wall time and peak RSS are its own), with the same data, steps and evaluation as every other
cell of its domain; dense LoRA is the 100% reference of its domain. Finished cells are cached under
``bench/results/cache/method_table/<budget tag>/`` (a changed ``BUDGET`` means new cells) and skipped on
the next invocation; an unfinished cell checkpoints every 25 steps and resumes from there when the same
command runs again, so the table can be completed over several sittings; a cached cell evaluated with
other settings than ``EVAL`` is re-evaluated from its exported checkpoint. A cell of this budget recorded in the
committed ``method_table.json`` whose cache folder is not here (a fresh clone) keeps its recorded row (marked
``recorded``; an ``xpert_default`` row only while its ``run_config`` is still what the domain config ships, else under
the method whose config it ran).
Accuracies carry 95% Wilson intervals. Defaults are chosen only on the validation column: perplexity of every cell's export on
``health_valid`` / ``legal_valid`` (held out of the training data); the test sets (PubMedQA and CaseHOLD test,
MultiLegalPile eval) choose nothing. The post-hoc baselines (LoRA, then prune) are the dense cell's
export pruned one-shot (``train.max_steps=0``), so their training is run once per domain. A cell whose
resolved run config equals a finished cell's (e.g. ``xpert_default`` and the variant it ships) is that
cell; when the shipped default changes, a cached ``xpert_default`` is moved to the variant it ran. Writes ``bench/results/method_table.json`` and ``.md``.
The cells (budget, methods, domains) are defined in ``cells.py``; the table is written by ``report.py``.
Time and memory against plain LoRA are measured side by side by ``timing.py`` (the cells run hours
apart on a shared machine); the goals section uses that measurement when it exists.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cells  # noqa: E402  (cells.BUDGET, cells.CACHE, cells.TABLE: the budget --budget selects)
from cells import (BUDGETS, DOMAINS, EVAL, METHODS, MODEL, OUT, POSTHOC, RESUME, ROOT, VALID,  # noqa: E402
                   VALID_WINDOWS, budget_tag, cell_name, model_override, parse_cell_name)
from report import (_train_peak, carry_over, default_twins, markdown, renamed_defaults, summarise,  # noqa: E402
                    write_figure)

# torch threads of every cell (``--threads``; None: torch's default, one per core). Two cells sharing 2 cores with
# 2 OpenMP threads each took 60-80 s per training step each, against 10 s for one such cell alone (measured
# on this machine, 2026-12-01): oversubscribed OpenMP threads spin while their partner waits for a core.
THREADS: list[int] = []


def launch(name: str, out: Path, domain: str, overrides: list[str], cache: Path,
           cpus: str | None = None) -> dict | None:
    """One run of ``launchers/run.py`` in its own process (its own wall time and peak RSS); log in ``cache``.
    ``cpus`` pins the process to those cores (``taskset -c``; timing.py's concurrent runs)."""
    cmd = [sys.executable, str(ROOT / "launchers" / "run.py"), "--config", str(DOMAINS[domain]), "--no-progress",
           f"name={name}", f"output_dir={out}", *overrides]
    print(f"[method_table] running {name}", flush=True)
    t0 = time.perf_counter()
    log = cache / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # appended: a resumed cell keeps the log of its earlier sittings
        threads = {k: str(THREADS[0]) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if THREADS else {}
        pin = ["taskset", "-c", cpus] if cpus else []
        rc = subprocess.call([*pin, "nice", "-n", "5", *cmd], stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", **threads})
    if rc != 0 and "was written by a different run config" in log.read_text()[-4000:] and (out / "checkpoints").is_dir():
        # the code's config grew fields since this cell checkpointed: its checkpoint cannot resume, start afresh
        import shutil

        print(f"[method_table] {name}: checkpoint from another config version, restarting the cell", flush=True)
        shutil.rmtree(out)
        return launch(name, out, domain, overrides, cache, cpus)
    if rc != 0:
        print(f"[method_table] {name} failed (rc {rc}); see {log}", flush=True)
        return None
    from xpert_dist.utils.atomic import atomic_write_json

    res = json.loads((out / "results.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", res)
    # a finished cell never resumes: its checkpoints (~2.8 GB for a 150-step cell) go, its export stays
    import shutil

    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return res


def cell_overrides(domain: str, method: str, sparsity: float, extra: list[str]) -> list[str]:
    """The overrides a cell runs with (after its domain config)."""
    overrides = [f"prune.sparsity={sparsity}", *cells.BUDGET, *RESUME, *EVAL, *METHODS[method], *MODEL, *extra]
    if method in POSTHOC:  # the dense cell's export pruned one-shot; its "base model" is that export, so no
        # base-model reference (the dense cell is the reference)
        overrides += [f"model.name_or_path={cells.CACHE / cell_name(domain, 'dense_lora', sparsity) / 'model'}",
                      "train.max_steps=0", "eval.base_reference=false"]
    return overrides


def run_cell(domain: str, method: str, sparsity: float, extra: list[str]) -> dict | None:
    name = cell_name(domain, method, sparsity)
    out = cells.CACHE / name
    overrides = cell_overrides(domain, method, sparsity, extra)
    if (out / "results.json").is_file():
        if not _stale(out, domain, overrides):
            return current_evaluation(out)
        _set_aside(out, domain, sparsity)
    same = _finished_twin(domain, overrides)
    if same is not None:
        print(f"[method_table] {name}: same run config as {same.name}, its results are this cell's", flush=True)
        import shutil

        shutil.copytree(same, out, symlinks=True, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
        return current_evaluation(out)
    dense = None
    if method in POSTHOC:
        dense = run_cell(domain, "dense_lora", sparsity, extra)
        if dense is None:
            return None
    res = launch(name, out, domain, overrides, cells.CACHE)
    if res is not None and dense is not None:
        res = _posthoc_accounting(out, res, dense)
    return None if res is None else current_evaluation(out)


def _resolved(domain: str, overrides: list[str]) -> dict:
    """The run config a cell's overrides give, without its name and paths."""
    from xpert_dist.config import load_config

    d = load_config(DOMAINS[domain], overrides).to_dict()
    return {k: v for k, v in d.items() if k not in ("name", "output_dir")}


def _comparable(cfg: dict) -> dict:
    """A run config without name and paths of its own, fields added since it was written at their defaults,
    model path resolved (a worktree or symlink is the same model), evaluation reduced to the settings that
    change a metric."""
    from xpert_dist.config import config_from_dict

    out = {k: v for k, v in config_from_dict(cfg).to_dict().items() if k not in ("name", "output_dir")}
    path = os.path.realpath(out["model"]["name_or_path"])
    # a model under the bench cache is the same model from any checkout or worktree (also one removed since)
    path = path.split("/bench/results/cache/", 1)[-1]
    out["model"] = {**out["model"], "name_or_path": path}
    out["eval"] = _metric_settings(out["eval"])
    return _canonical_schedule(out)


def _canonical_schedule(cfg: dict) -> dict:
    """The in-loop schedule in one spelling: ``prune.prune_steps=n`` becomes the ``prune.prune_every`` that
    places the same prune steps (25, 50, 75, 100 at 150 steps with the mask final at 100: ``prune_every=25``),
    so that two runs pruning at the same steps are the same run however their config said it."""
    from xpert_dist.config import PruneConfig
    from xpert_dist.train.schedule import plan_prune_steps

    prune = cfg["prune"]
    if prune.get("schedule") != "steps" or not prune.get("prune_steps"):
        return cfg
    def plan(p: dict):
        return plan_prune_steps(PruneConfig(**{k: v for k, v in p.items() if k in PruneConfig.__dataclass_fields__}),
                                1, cfg["train"]["max_steps"])

    counted = plan(prune)
    every = {**prune, "prune_steps": 0, "prune_every": counted.steps[0]} if counted.steps else None
    return {**cfg, "prune": every} if every is not None and plan(every) == counted else cfg


def _stale(out: Path, domain: str, overrides: list[str]) -> bool:
    """Whether a finished cell ran another config than its method now gives (e.g. ``xpert_default`` after the
    domain config changed). Only the shipped default can change meaning: every other method pins its options."""
    cfg = json.loads((out / "results.json").read_text()).get("config")
    return bool(cfg) and parse_cell_name(out.name)[1] == "xpert_default" and \
        _comparable(cfg) != _comparable(_resolved(domain, overrides))


def _set_aside(out: Path, domain: str, sparsity: float) -> None:
    """Move a stale cell to the method whose config it ran (if that cell is not there yet), else out of the
    table (``<cell>.stale``): its results stay, under the name of what they measured."""
    cfg = _comparable(json.loads((out / "results.json").read_text())["config"])
    for method in METHODS:
        if method == "xpert_default":
            continue
        target = cells.CACHE / cell_name(domain, method, sparsity)
        if _comparable(_resolved(domain, cell_overrides(domain, method, sparsity, []))) == cfg:
            if not (target / "results.json").is_file():
                print(f"[method_table] {out.name} ran what is now {target.name}: moved there", flush=True)
                out.rename(target)
                log = cells.CACHE / f"{out.name}.log"
                if log.is_file():
                    log.rename(cells.CACHE / f"{target.name}.log")
                return
            break
    dest = out.with_name(out.name + ".stale")
    print(f"[method_table] {out.name} ran another config than the shipped default: set aside as {dest.name}",
          flush=True)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    out.rename(dest)


def _finished_twin(domain: str, overrides: list[str]) -> Path | None:
    """A finished cell of this budget whose run config equals the one ``overrides`` give, if any."""
    want = _comparable(_resolved(domain, overrides))
    for res_file in sorted(cells.CACHE.glob(f"{domain}-*/results.json")):
        if res_file.parent.name.endswith(".stale"):
            continue
        cfg = json.loads(res_file.read_text()).get("config", {})
        if cfg and _comparable(cfg) == want:
            return res_file.parent
    return None


def _posthoc_accounting(out: Path, res: dict, dense: dict) -> dict:
    """A post-hoc cell's time and memory include the dense cell's training it was derived from."""
    from xpert_dist.utils.atomic import atomic_write_json

    if res.get("derived_from"):  # already accounted
        return res
    res["derived_from"] = "dense_lora"
    for key in ("train_s", "train_cpu_s"):
        res["timing"][key] = dense["timing"].get(key, 0.0) + res["timing"].get(key, 0.0)
    for key in ("peak_rss_mb", "peak_rss_after_train_mb"):
        if key in res.get("memory", {}) and key in dense.get("memory", {}):
            res["memory"][key] = max(res["memory"][key], dense["memory"][key])
    if "peak_rss_after_final_prune_mb" in res.get("memory", {}):
        res["memory"]["peak_rss_after_final_prune_mb"] = max(res["memory"]["peak_rss_after_final_prune_mb"],
                                                             _train_peak(dense))
    res["wall_s"] = res.get("wall_s", 0.0) + dense.get("wall_s", 0.0)
    atomic_write_json(out / "results.json", res)
    return res


def valid_perplexity(out: Path, domain: str) -> float:
    """Perplexity of the cell's export on its domain's validation split (``VALID_WINDOWS`` windows)."""
    import torch
    from transformers import AutoModelForCausalLM

    from xpert_dist.config import load_config
    from xpert_dist.eval.perplexity import heldout_windows, perplexity
    from xpert_dist.models.loading import load_tokenizer

    from xpert_dist.data.sources import load_records

    cfg = load_config(DOMAINS[domain], [*cells.BUDGET, *EVAL, *MODEL])
    res = json.loads((out / "results.json").read_text())
    same_text = (cfg.eval.perplexity_data is None
                 and list(load_records(VALID[domain])["id"]) == list(load_records(f"{domain}_heldout")["id"]))
    if same_text and cfg.eval.perplexity_windows == VALID_WINDOWS and "perplexity" in res.get("metrics", {}):
        return res["metrics"]["perplexity"]  # the same windows of the same records were just scored (health)
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    windows = heldout_windows(VALID[domain], load_tokenizer(cfg.model), cfg.eval.perplexity_seq_len, VALID_WINDOWS)
    return perplexity(model, windows, batch_size=cfg.eval.batch_size, progress=False)


def current_evaluation(out: Path) -> dict:
    """The cell's results, re-evaluated first if its evaluation settings are not ``EVAL``'s."""
    from dataclasses import asdict

    import torch
    from transformers import AutoModelForCausalLM

    from xpert_dist.config import load_config
    from xpert_dist.eval.retention import evaluate
    from xpert_dist.models.loading import load_tokenizer
    from xpert_dist.utils.atomic import atomic_write_json

    res = json.loads((out / "results.json").read_text())
    domain = out.name.split("-")[0]
    if "valid_perplexity" not in res.get("metrics", {}):
        print(f"[method_table] {out.name}: perplexity on the validation split {VALID[domain]}", flush=True)
        res["metrics"]["valid_perplexity"] = valid_perplexity(out, domain)
        atomic_write_json(out / "results.json", res)
    cfg = load_config(DOMAINS[domain], [*cells.BUDGET, *EVAL, *MODEL])
    if _metric_settings(res["config"]["eval"]) == _metric_settings(asdict(cfg.eval)):
        return res
    print(f"[method_table] re-evaluating {out.name} with {' '.join(EVAL)}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    res.setdefault("metrics_at_run", res["metrics"])
    old, new = res["config"]["eval"], asdict(cfg.eval)
    task_keys = ("tasks", "max_task_examples", "batch_size")
    if all(old[k] == new[k] for k in task_keys):  # only the perplexity settings changed: keep the task metrics
        ppl_only = load_config(DOMAINS[domain], [*cells.BUDGET, *EVAL, *MODEL, "eval.tasks=[]"])
        kept = {k: v for k, v in res["metrics"].items() if not k.startswith("perplexity") or k == "valid_perplexity"}
        res["metrics"] = {**evaluate(model, load_tokenizer(cfg.model), ppl_only, progress=False), **kept}
    else:
        res["metrics"] = {**evaluate(model, load_tokenizer(cfg.model), cfg, progress=False),
                          "valid_perplexity": res["metrics"]["valid_perplexity"]}
    res["config"]["eval"] = asdict(cfg.eval)
    atomic_write_json(out / "results.json", res)
    return res


def recorded_rows() -> dict[str, dict]:
    """The rows of the committed ``method_table.json`` when it is of this budget (else none)."""
    path = OUT / f"{cells.TABLE}.json"
    if not path.is_file():
        return {}
    rec = json.loads(path.read_text())
    return rec.get("cells", {}) if rec.get("budget_tag") == budget_tag() else {}


def _filled(cfg: dict) -> dict:
    """A comparable run config (``_comparable``'s output) with fields added since it was written at their
    defaults; its model path stays as it is."""
    from xpert_dist.config import config_from_dict

    out = {k: v for k, v in config_from_dict(cfg).to_dict().items() if k not in ("name", "output_dir")}
    out["model"] = {**out["model"], "name_or_path": cfg["model"]["name_or_path"]}
    out["eval"] = _metric_settings(out["eval"])
    return _canonical_schedule(out)


def _metric_settings(eval_cfg: dict) -> dict:
    """The evaluation settings that change a metric (the base-model reference only adds a report row)."""
    return {k: v for k, v in eval_cfg.items() if k != "base_reference"}



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="health,legal")
    ap.add_argument("--sparsities", default="0.4,0.5")
    ap.add_argument("--only", default=None, help="comma-separated method names (default: all)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every cell")
    ap.add_argument("--report", action="store_true", help="only write the table from the finished cells")
    ap.add_argument("--budget", default=cells.DEFAULT_BUDGET, choices=sorted(BUDGETS),
                    help="the cells' budget (cells.BUDGETS; default: issue 10's 150 steps); another budget has its own "
                         "cache folder and its own table files (method_table_<budget>.*)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per cell (default: one per core); cores / cells for cells side by side")
    args = ap.parse_args()
    cells.use_budget(args.budget)
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        THREADS.append(args.threads)
    MODEL.extend(model_override())
    methods = [] if args.report else args.only.split(",") if args.only else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--only: unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    bad = [d for d in args.domains.split(",") if d not in DOMAINS]
    if bad:
        ap.error(f"--domains: unknown domain(s) {', '.join(bad)} (known: {', '.join(DOMAINS)})")
    finished = {}
    for domain in args.domains.split(","):
        for s in (float(x) for x in args.sparsities.split(",")):
            for method in methods:
                name = cell_name(domain, method, s)
                if name in finished:
                    continue
                res = run_cell(domain, method, s, args.extra)
                if res is not None:
                    finished[name] = res
    for res_file in sorted(cells.CACHE.glob("*/results.json")):  # include cells of this budget from earlier sittings
        out = res_file.parent
        if out.name in finished or out.name.endswith(".stale"):
            continue
        domain, method, pct = parse_cell_name(out.name)
        if method == "xpert_default":  # the shipped default: only if it still is what the domain config ships
            if _stale(out, domain, cell_overrides(domain, method, pct / 100, args.extra)):
                print(f"[method_table] {out.name}: not the current shipped default (run it again: "
                      f"--domains {domain} --sparsities {pct / 100} --only xpert_default)", flush=True)
                continue
        finished[out.name] = current_evaluation(out)
    recorded = recorded_rows()
    for domain in DOMAINS:  # retention of new cells against a dense cell recorded on another machine
        dense = cell_name(domain, "dense_lora", 0.0)
        if finished and dense not in finished and dense in recorded:
            finished[dense] = recorded[dense]
    if not finished:  # nothing finished at this budget: keep the recorded table
        print(f"[method_table] no finished cell at this budget; bench/results/{cells.TABLE}.* left as they are")
        return 0
    table = summarise(finished)
    for name, row in table.items():
        if finished[name] is recorded.get(name):  # the recorded dense row stood in for its cell: kept as recorded
            table[name] = {**recorded[name], "recorded": True}
        elif finished[name].get("config"):
            row["run_config"] = _comparable(finished[name]["config"])
    for row in recorded.values():  # fields added to the config since the row was written, at their defaults
        if row.get("run_config"):
            row["run_config"] = _filled(row["run_config"])
    # what the domain configs ship, per xpert_default cell (of this sitting's grid and of the recorded rows)
    grid = {cell_name(d, "xpert_default", float(x)) for d in DOMAINS for x in args.sparsities.split(",")}
    shipped = {name: _comparable(_resolved(parse_cell_name(name)[0], cell_overrides(
        parse_cell_name(name)[0], "xpert_default", parse_cell_name(name)[2] / 100, args.extra)))
        for name in grid | {n for n in recorded if parse_cell_name(n)[1] == "xpert_default"}}
    kept = carry_over(recorded, table, shipped)
    kept.update(renamed_defaults(recorded, table, shipped, lambda d, m, sp: _comparable(_resolved(
        d, cell_overrides(d, m, sp, args.extra)))))
    if kept:
        print(f"[method_table] {len(kept)} cell(s) without a cache folder here kept as recorded: "
              f"{', '.join(sorted(kept))}", flush=True)
    table.update(kept)
    table.update(default_twins(table, shipped))
    OUT.mkdir(parents=True, exist_ok=True)
    from xpert_dist.utils.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(OUT / f"{cells.TABLE}.json", {"budget": cells.BUDGET, "budget_tag": budget_tag(), "eval": EVAL,
                                                    "model": MODEL, "cells": table})
    md = markdown(table)
    atomic_write_text(OUT / f"{cells.TABLE}.md", md)
    write_figure(table, OUT / f"{cells.TABLE}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
