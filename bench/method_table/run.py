#!/usr/bin/env python
"""The EfficientXpert method table on SmolLM2-135M: every baseline and variant, side by side.

    python bench/method_table/run.py [--domains health,legal] [--sparsities 0.4,0.5] [--only NAME,...]

Each cell (domain × sparsity × method) is one run of ``launchers/run.py`` in its own process (so
its wall time and peak RSS are its own), with the same data, steps and evaluation as every other
cell of its domain; dense LoRA is the 100% reference of its domain. Finished cells are cached under
``bench/results/cache/method_table/<budget tag>/`` (a changed ``BUDGET`` means new cells) and skipped on
the next invocation; an unfinished cell checkpoints every 25 steps and resumes from there when the same
command runs again, so the table can be completed over several sittings; a cached cell evaluated with
other settings than ``EVAL`` is re-evaluated from its exported checkpoint. Accuracies carry 95% Wilson
intervals. Defaults are chosen only on the validation column: perplexity of every cell's export on
``health_valid`` / ``legal_valid`` (held out of the training data); the test sets (PubMedQA and CaseHOLD test,
MultiLegalPile eval) choose nothing. The post-hoc baselines (LoRA, then prune) are the dense cell's
export pruned one-shot (``train.max_steps=0``), so their training is run once per domain. A cell whose
resolved run config equals a finished cell's (e.g. ``xpert_default`` and the variant it ships) is that
cell. Writes ``bench/results/method_table.json`` and ``.md``.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
CACHE_ROOT = ROOT / "bench" / "results" / "cache" / "method_table"
OUT = ROOT / "bench" / "results"

# name -> overrides; every cell shares the domain config below. Groups and the moment the mask becomes
# final (prune.mask_final) are explicit so that a cell does not change meaning when a default changes.
EX = ["prune.method=foresight", "prune.variant=exact"]
END = ["prune.mask_final=end"]  # the released recipe: dense adapter, merge and re-mask after training
MASKED = ["prune.mask_final=last_inloop"]  # the mask is final at the last prune step, the adapter trains masked
METHODS = {
    "dense_lora": ["prune.method=none"],
    # post-hoc baselines: LoRA, then prune the merged model once
    "lora_wanda": ["prune.method=wanda", "prune.schedule=final_only", "prune.pbs=off", "prune.group=output", *END],
    "lora_sparsegpt": ["prune.method=sparsegpt", "prune.schedule=final_only", "prune.pbs=off", *END],
    # prune first, then train the adapter under the fixed mask (SQFT-style): the merge is what was trained
    "wanda_masked_lora": ["prune.method=wanda", "prune.schedule=before_training", "prune.pbs=off",
                          "prune.group=output", *MASKED],
    "sparsegpt_masked_lora": ["prune.method=sparsegpt", "prune.schedule=before_training", "prune.pbs=off", *MASKED],
    # the shipped EfficientXpert default: the domain config as it ships (only the budget overridden)
    "xpert_default": [],
    # EfficientXpert with the masked adapter and the compensations of issue 10
    "xpert_masked": [*EX, "prune.pbs=off", "prune.group=output", *MASKED],
    "xpert_masked_obs": [*EX, "prune.pbs=off", "prune.reconstruct=obs", "prune.group=output", *MASKED],
    "xpert_masked_obs_reset": [*EX, "prune.pbs=off", "prune.reconstruct=obs", "prune.adapter_reset=true",
                               "prune.group=output", *MASKED],
    "xpert_masked_obs_half": [*EX, "prune.pbs=off", "prune.reconstruct=obs", "prune.group=output",
                              "prune.mask_final=fraction:0.5"],
    "xpert_masked_pbs_base_full": [*EX, "prune.pbs=full", "prune.pbs_order=base", "prune.group=output", *MASKED],
    "xpert_masked_pbs_base_diag": [*EX, "prune.pbs=diagonal", "prune.pbs_order=base", "prune.group=output", *MASKED],
    "xpert_masked_pbs_full": [*EX, "prune.pbs=full", "prune.pbs_order=adapter", "prune.group=output", *MASKED],
    # the released recipe and its earlier variants (dense adapter until the end, then merge and re-mask)
    "wanda_lora": ["prune.method=wanda", "prune.schedule=before_training", "prune.pbs=off", "prune.group=output",
                   *END],
    "magnitude": ["prune.method=magnitude", "prune.pbs=off", "prune.group=output", *END],
    "foresight": [*EX, "prune.pbs=off", "prune.group=output", *END],
    "foresight_pbs_diag": [*EX, "prune.pbs=diagonal", "prune.group=output", *END],
    "foresight_pbs_full": [*EX, "prune.pbs=full", "prune.group=output", *END],
    "foresight_input_group": [*EX, "prune.pbs=diagonal", "prune.group=input", *END],
    "foresight_layer_group": [*EX, "prune.pbs=diagonal", "prune.group=layer", *END],
    "foresight_reference": ["prune.method=foresight", "prune.variant=reference", "prune.pbs=diagonal",
                            "prune.group=output", *END],
}
# LoRA, then prune: the dense cell's training with a one-shot prune of its export (train.max_steps=0), which
# tests/train/test_posthoc.py pins to one run that trains densely and prunes at the end. Their time is the
# dense cell's training plus their own prune step; their peak memory the larger of the two.
POSTHOC = {"lora_wanda", "lora_sparsegpt"}
# validation splits (held out of the training data, never a test file): defaults are chosen on these
VALID = {"health": "health_valid", "legal": "legal_valid"}
VALID_WINDOWS = 32
# every cell but the shipped default says what it reconstructs (the domain configs ship prune.reconstruct=obs)
for _name, _ov in METHODS.items():
    if _name != "xpert_default" and not any(o.startswith("prune.reconstruct=") for o in _ov):
        _ov.insert(0, "prune.reconstruct=off")
EFFICIENTXPERT = [m for m in METHODS if m.startswith(("foresight_", "xpert_"))]
BASELINES = ["lora_wanda", "lora_sparsegpt", "wanda_masked_lora", "sparsegpt_masked_lora"]
SPARSITY_FREE = {"dense_lora"}
DOMAINS = {"health": ROOT / "configs" / "default_health.yaml", "legal": ROOT / "configs" / "default_legal.yaml"}
# the budget of every cell (same for all): overrides applied after the domain config. Issue 10: a
# budget where fine-tuning matters: 150 optimizer steps of 4 x 256 tokens, 32 calibration windows per
# prune step; in-loop variants prune every 50 steps (steps 50 and 100, then the final mask).
BUDGET = ["train.max_steps=150", "train.batch_size=4", "data.seq_len=256", "data.calib_samples=32",
          "prune.prune_every=50"]
# not part of the budget: a cell checkpoints every 25 steps, so a cell left unfinished resumes from its
# last checkpoint when the same command runs again (a finished cell is skipped)
RESUME = ["train.checkpoint_every=25"]
# PubMedQA: all 400 test items; CaseHOLD: all 200 (the cap is above both sizes); 32 held-out windows
EVAL = ["eval.max_task_examples=400", "eval.perplexity_windows=32"]


def budget_tag() -> str:
    """Cells of one budget share a cache folder: a changed budget means new cells (old ones stay)."""
    import hashlib

    return "b" + hashlib.sha256(" ".join(BUDGET).encode()).hexdigest()[:8]


CACHE = CACHE_ROOT / budget_tag()


def model_override() -> list[str]:
    """Every cell loads the same weights: SmolLM2-135M dequantised once to fp32 safetensors (the GGUF
    alias gives identical weights but spends ~20-50 s per cell dequantising)."""
    sys.path.insert(0, str(ROOT / "bench" / "oneshot"))
    import common  # noqa: E402
    import prepare  # noqa: E402

    prepare.convert_model()
    return [f"model.name_or_path={common.model_dir()}"]


def cell_name(domain: str, method: str, sparsity: float) -> str:
    return f"{domain}-{method}" if method in SPARSITY_FREE else f"{domain}-{method}-s{int(round(sparsity * 100))}"


MODEL: list[str] = []


def launch(name: str, out: Path, domain: str, overrides: list[str], cache: Path) -> dict | None:
    """One run of ``launchers/run.py`` in its own process (its own wall time and peak RSS); log in ``cache``."""
    cmd = [sys.executable, str(ROOT / "launchers" / "run.py"), "--config", str(DOMAINS[domain]), "--no-progress",
           f"name={name}", f"output_dir={out}", *overrides]
    print(f"[method_table] running {name}", flush=True)
    t0 = time.perf_counter()
    log = cache / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # appended: a resumed cell keeps the log of its earlier sittings
        rc = subprocess.call(["nice", "-n", "5", *cmd], stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    if rc != 0 and "was written by a different run config" in log.read_text()[-4000:] and (out / "checkpoints").is_dir():
        # the code's config grew fields since this cell checkpointed: its checkpoint cannot resume, start afresh
        import shutil

        print(f"[method_table] {name}: checkpoint from another config version, restarting the cell", flush=True)
        shutil.rmtree(out)
        return launch(name, out, domain, overrides, cache)
    if rc != 0:
        print(f"[method_table] {name} failed (rc {rc}); see {log}", flush=True)
        return None
    res = json.loads((out / "results.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(res))
    return res


def run_cell(domain: str, method: str, sparsity: float, extra: list[str]) -> dict | None:
    name = cell_name(domain, method, sparsity)
    out = CACHE / name
    if (out / "results.json").is_file():
        return current_evaluation(out)
    overrides = [f"prune.sparsity={sparsity}", *BUDGET, *RESUME, *EVAL, *METHODS[method], *MODEL, *extra]
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
        # its "base model" would be the dense export: no base-model reference (the dense cell is the reference)
        overrides += [f"model.name_or_path={CACHE / cell_name(domain, 'dense_lora', sparsity) / 'model'}",
                      "train.max_steps=0", "eval.base_reference=false"]
    res = launch(name, out, domain, overrides, CACHE)
    if res is not None and dense is not None:
        res = _posthoc_accounting(out, res, dense)
    return None if res is None else current_evaluation(out)


def _resolved(domain: str, overrides: list[str]) -> dict:
    """The run config a cell's overrides give, without its name and paths."""
    from xpert_dist.config import load_config

    d = load_config(DOMAINS[domain], overrides).to_dict()
    return {k: v for k, v in d.items() if k not in ("name", "output_dir")}


def _comparable(cfg: dict) -> dict:
    """A run config without name and paths of its own, model path resolved (a worktree or symlink is the same
    model), evaluation reduced to the settings that change a metric."""
    out = {k: v for k, v in cfg.items() if k not in ("name", "output_dir")}
    out["model"] = {**out["model"], "name_or_path": os.path.realpath(out["model"]["name_or_path"])}
    out["eval"] = _metric_settings(out["eval"])
    return out


def _finished_twin(domain: str, overrides: list[str]) -> Path | None:
    """A finished cell of this budget whose run config equals the one ``overrides`` give, if any."""
    want = _comparable(_resolved(domain, overrides))
    for res_file in sorted(CACHE.glob(f"{domain}-*/results.json")):
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

    cfg = load_config(DOMAINS[domain], [*BUDGET, *EVAL, *MODEL])
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
    cfg = load_config(DOMAINS[domain], [*BUDGET, *EVAL, *MODEL])
    if _metric_settings(res["config"]["eval"]) == _metric_settings(asdict(cfg.eval)):
        return res
    print(f"[method_table] re-evaluating {out.name} with {' '.join(EVAL)}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    res.setdefault("metrics_at_run", res["metrics"])
    old, new = res["config"]["eval"], asdict(cfg.eval)
    task_keys = ("tasks", "max_task_examples", "batch_size")
    if all(old[k] == new[k] for k in task_keys):  # only the perplexity settings changed: keep the task metrics
        ppl_only = load_config(DOMAINS[domain], [*BUDGET, *EVAL, *MODEL, "eval.tasks=[]"])
        kept = {k: v for k, v in res["metrics"].items() if not k.startswith("perplexity") or k == "valid_perplexity"}
        res["metrics"] = {**evaluate(model, load_tokenizer(cfg.model), ppl_only, progress=False), **kept}
    else:
        res["metrics"] = {**evaluate(model, load_tokenizer(cfg.model), cfg, progress=False),
                          "valid_perplexity": res["metrics"]["valid_perplexity"]}
    res["config"]["eval"] = asdict(cfg.eval)
    atomic_write_json(out / "results.json", res)
    return res


def _metric_settings(eval_cfg: dict) -> dict:
    """The evaluation settings that change a metric (the base-model reference only adds a report row)."""
    return {k: v for k, v in eval_cfg.items() if k != "base_reference"}


def wilson(acc: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on ``n`` items."""
    if not n:
        return float("nan"), float("nan")
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((acc * (1 - acc) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def _train_peak(res: dict) -> float:
    """Peak RSS up to the end of the final prune (training and pruning; before export and evaluation)."""
    mem = res.get("memory", {})
    return mem.get("peak_rss_after_final_prune_mb") or mem.get("peak_rss_after_train_mb") or mem["peak_rss_mb"]


def summarise(cells: dict[str, dict]) -> dict:
    from xpert_dist.eval.retention import retention

    table = {}
    for name, res in cells.items():
        domain = name.split("-")[0]
        dense = cells.get(f"{domain}-dense_lora")
        mets = dict(res.get("metrics", {}))
        for key in [k for k in mets if k.endswith("_acc") and f"{k[:-4]}_n" in mets]:
            mets[f"{key}_ci95"] = list(wilson(mets[key], int(mets[f"{key[:-4]}_n"])))
        row = {"metrics": mets, "timing": res.get("timing", {}), "memory": res.get("memory", {}),
               "sparsity": res.get("config", {}).get("prune", {}).get("sparsity") if "-s" in name else 0.0}
        if dense:
            valid, dense_valid = res["metrics"].get("valid_perplexity"), dense["metrics"].get("valid_perplexity")
            ev = {k: v for k, v in res.get("metrics", {}).items() if k != "valid_perplexity"}
            row["retention"] = retention(ev, {k: v for k, v in dense["metrics"].items() if k != "valid_perplexity"})
            row["valid_retention"] = dense_valid / valid if valid and dense_valid else None
            t_d = dense["timing"].get("train_s", 0) + dense["timing"].get("prune_s", 0)
            t_r = res["timing"].get("train_s", 0) + res["timing"].get("prune_s", 0)
            row["time_vs_lora"] = t_r / t_d if t_d else None
            c_d = dense["timing"].get("train_cpu_s", 0) + dense["timing"].get("prune_cpu_s", 0)
            c_r = res["timing"].get("train_cpu_s", 0) + res["timing"].get("prune_cpu_s", 0)
            row["cpu_time_vs_lora"] = c_r / c_d if c_d and c_r else None
            row["peak_rss_vs_lora"] = res["memory"]["peak_rss_mb"] / dense["memory"]["peak_rss_mb"]
            row["train_peak_rss_vs_lora"] = _train_peak(res) / _train_peak(dense)
        table[name] = row
    return table


def goals(table: dict) -> list[str]:
    """The issue's goals, checked against what was measured (only for cells that exist)."""
    lines = []
    for key in sorted({n.rsplit("-", 1)[0].split("-")[0] + "|" + n.rsplit("-s", 1)[1]
                       for n in table if "-s" in n}):
        domain, pct = key.split("|")
        ret = {m: table[f"{domain}-{m}-s{pct}"]["retention"]["domain_retention"]
               for m in METHODS if f"{domain}-{m}-s{pct}" in table and "retention" in table[f"{domain}-{m}-s{pct}"]}
        ours = {m: r for m, r in ret.items() if m in EFFICIENTXPERT}
        if not ours:
            continue
        best = max(ours, key=ours.get)
        peers = {m: ret[m] for m in BASELINES if m in ret}
        beats = ", ".join(f"{'above' if ours[best] > v else 'NOT above'} {m} ({v:.1%})" for m, v in peers.items())
        # perplexity retention: the less noisy metric (accuracy on 60 items moves 1.7 points per item)
        ppl = {m: table[f"{domain}-{m}-s{pct}"]["retention"].get("perplexity") for m in ret}
        best_ppl = max((m for m in ours if ppl.get(m) is not None), key=lambda m: ppl[m], default=None)
        if best_ppl:
            beats += (f"; by perplexity retention the best variant is `{best_ppl}` ({ppl[best_ppl]:.1%}) vs "
                      + ", ".join(f"{m} {ppl[m]:.1%}" for m in BASELINES if ppl.get(m)))
        if ppl.get("xpert_default") is not None:
            margins = {m: ppl["xpert_default"] - ppl[m] for m in BASELINES if ppl.get(m) is not None}
            beats += ("; shipped default `xpert_default` perplexity retention " + f"{ppl['xpert_default']:.1%}: "
                      + ", ".join(f"{'+' if v >= 0 else ''}{100 * v:.1f} points vs {m}"
                                  f" ({'goal >= +2 met' if v >= 0.02 else 'goal >= +2 not met'})"
                                  for m, v in margins.items()))
        default = table.get(f"{domain}-xpert_default-s{pct}")
        if default is not None:  # accuracy: not worse than any baseline beyond the default's 95% interval
            acc_key = next((k for k in default["metrics"] if k.endswith("_acc")), None)
            ci = default["metrics"].get(f"{acc_key}_ci95") if acc_key else None
            if ci:
                worse = [m for m in BASELINES if f"{domain}-{m}-s{pct}" in table
                         and table[f"{domain}-{m}-s{pct}"]["metrics"].get(acc_key, 0) > ci[1]]
                beats += (f"; `xpert_default` {acc_key} {default['metrics'][acc_key]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]: "
                          + (f"worse beyond its interval than {', '.join(worse)}" if worse
                             else "no baseline above its 95% interval"))
        row = dict(table[f"{domain}-{best}-s{pct}"])
        side_by_side = _timing_pair(domain, pct)
        if side_by_side:  # the quiet, alternating measurement replaces the cells' drifting timings
            row.update(time_vs_lora=side_by_side["time_vs_lora"], cpu_time_vs_lora=side_by_side["cpu_vs_lora"],
                       train_peak_rss_vs_lora=side_by_side["peak_rss_vs_lora"])
        lines.append(f"- {domain} @ {pct}%: best EfficientXpert variant `{best}` retains {ours[best]:.1%}"
                     + (" (goal >= 90% perplexity retention: " + ("met" if (ppl.get(best_ppl) or 0) >= 0.90 else "not met")
                        + ")" if pct == "40" else "")
                     + (f"; {beats}" if beats else "")
                     + f"; time {row.get('time_vs_lora', float('nan')):.2f}x LoRA wall, "
                       f"{row.get('cpu_time_vs_lora') or float('nan'):.2f}x CPU (goal <= 1.10x), training peak RSS "
                       f"{row.get('train_peak_rss_vs_lora', float('nan')):.3f}x LoRA (goal <= 1.02x)"
                     + (f" [time and memory: {side_by_side['method']}, bench/results/timing.md]" if side_by_side
                        else " [time and memory: this cell vs the dense cell, run at different moments]"))
    return lines


def validation_choice(table: dict) -> list[str]:
    """Per domain and sparsity: the EfficientXpert variants ranked by validation perplexity retention,
    with the baselines' beside them (what chooses the shipped defaults)."""
    lines = []
    for key in sorted({(n.split("-")[0], n.rsplit("-s", 1)[1]) for n in table if "-s" in n}):
        domain, pct = key
        val = {m: table[f"{domain}-{m}-s{pct}"].get("valid_retention") for m in METHODS
               if f"{domain}-{m}-s{pct}" in table}
        ours = sorted(((v, m) for m, v in val.items() if m in EFFICIENTXPERT and v), reverse=True)
        peers = [(m, val[m]) for m in BASELINES if val.get(m)]
        if ours:
            lines.append(f"- {domain} @ {pct}%: " + ", ".join(f"`{m}` {v:.1%}" for v, m in ours)
                         + ("; baselines " + ", ".join(f"{m} {v:.1%}" for m, v in peers) if peers else ""))
    return lines


def _timing_pair(domain: str, pct: str) -> dict | None:
    """The side-by-side measurement of bench/method_table/timing.py for this domain and sparsity, if any."""
    path = OUT / "timing.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("budget") != BUDGET:  # measured at another budget: not this table's
        return None
    args = data["args"]
    if args["domain"] != domain or int(round(args["sparsity"] * 100)) != int(pct):
        return None
    row = data["summary"].get(args["method"])
    return {**row, "method": args["method"]} if row and "time_vs_lora" in row else None


def markdown(table: dict) -> str:
    def f(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "–"

    lines = ["| cell | validation ppl (ret.) | domain retention | perplexity (ret.) | accuracy [95% Wilson] (ret.) | "
             "wall time / LoRA | CPU time / LoRA | train+prune peak RSS / LoRA | whole-run peak RSS / LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(table.items(), key=lambda kv: (kv[0].split("-")[0], kv[1]["sparsity"] or 0, kv[0])):
        ret = row.get("retention", {})
        mets = row["metrics"]
        acc_key = next((k for k in mets if k.endswith("_acc")), None)
        ci = mets.get(f"{acc_key}_ci95") if acc_key else None
        ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        lines.append(f"| {name} | {f(mets.get('valid_perplexity'), '.2f')} ({f(row.get('valid_retention'), '.1%')}) "
                     f"| {f(ret.get('domain_retention'), '.1%')} | {f(mets.get('perplexity'), '.2f')} "
                     f"({f(ret.get('perplexity'), '.1%')}) | {f(mets.get(acc_key), '.3f')}{ci_s} "
                     f"({f(ret.get(acc_key), '.1%')}) | {f(row.get('time_vs_lora'), '.2f')}× | "
                     f"{f(row.get('cpu_time_vs_lora'), '.2f')}× | "
                     f"{f(row.get('train_peak_rss_vs_lora'), '.3f')}× | {f(row.get('peak_rss_vs_lora'), '.3f')}× |")
    out = "\n".join(lines) + "\n"
    out += ("\nTime and memory columns compare each cell with its domain's dense cell, run at another moment "
            "on a machine shared with other work: wall and CPU times drift by up to 2-4x between cells. "
            "The side-by-side measurement is `bench/results/timing.md` (bench/method_table/timing.py).\n")
    v = validation_choice(table)
    if v:
        out += ("\n## Defaults chosen on the validation splits\n\nPerplexity retention on "
                + ", ".join(f"`{a}`" for a in VALID.values()) + f" ({VALID_WINDOWS} windows; held out of the "
                "training data, never a test file), EfficientXpert variants best first:\n\n" + "\n".join(v) + "\n")
    g = goals(table)
    if g:
        out += "\n## Goals (issue 10) against these measurements\n\n" + "\n".join(g) + "\n"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="health,legal")
    ap.add_argument("--sparsities", default="0.4,0.5")
    ap.add_argument("--only", default=None, help="comma-separated method names (default: all)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every cell")
    args = ap.parse_args()
    MODEL.extend(model_override())
    methods = args.only.split(",") if args.only else list(METHODS)
    cells = {}
    for domain in args.domains.split(","):
        for s in (float(x) for x in args.sparsities.split(",")):
            for method in methods:
                name = cell_name(domain, method, s)
                if name in cells:
                    continue
                res = run_cell(domain, method, s, args.extra)
                if res is not None:
                    cells[name] = res
    for res_file in sorted(CACHE.glob("*/results.json")):  # include cells of this budget from earlier sittings
        if res_file.parent.name not in cells:
            cells[res_file.parent.name] = current_evaluation(res_file.parent)
    if not cells:  # nothing finished at this budget: keep the recorded table of the previous one
        print("[method_table] no finished cell at this budget; bench/results/method_table.* left as they are")
        return 0
    table = summarise(cells)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "method_table.json").write_text(json.dumps({"budget": BUDGET, "budget_tag": budget_tag(), "eval": EVAL,
                                                       "model": MODEL, "cells": table}, indent=2))
    md = markdown(table)
    (OUT / "method_table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
