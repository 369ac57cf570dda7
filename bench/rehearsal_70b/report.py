"""bench/results/rehearsal_70b.{json,md} from the cached cells (no cell is run here)."""
from __future__ import annotations

import json

from bench.rehearsal_70b.blocks import ALL_RUNS
from bench.rehearsal_70b.common import CACHE, GiB, MiB, RESULTS, SHAPES, _atomic_json
from bench.rehearsal_70b.extrapolate import extrapolate
from bench.rehearsal_70b.micro import MATRICES, PARTS
from bench.rehearsal_70b.planner import compare, predict

def _load(pattern: str) -> list[dict]:
    return [json.loads(x.read_text()) for x in sorted(CACHE.glob(pattern)) if not x.name.endswith(".config.json")]


def report() -> dict:
    micro_recs = _load("rh70-micro-*.json")
    harness_recs = _load("rh70-harness-*.json")
    pipe_recs = _load("rh70-pipeline-*.json")
    cells = []
    for rec in harness_recs:
        cmp_ = compare(rec)
        parts = {}
        for ph in rec["cell"].get("prune_runs", ALL_RUNS):
            r0 = rec["ranks"]
            parts[ph] = {"seconds_max_rank": max(r["phases"][ph]["seconds"] for r in r0),
                         "cpu_seconds_max_rank": max((r["phases"][ph].get("cpu_seconds") or 0.0) for r in r0) or None,
                         "parts_cpu_seconds_by_rank": [r["phases"][ph]["parts"].get("cpu_seconds") for r in r0],
                         "parts_seconds_by_rank": [r["phases"][ph]["parts"]["seconds"] for r in r0],
                         "step_cpu_by_rank": [r["phases"][ph].get("cpu_seconds") for r in r0],
                         "step_wall_by_rank": [r["phases"][ph]["seconds"] for r in r0]}
        cells.append({"cell": rec["cell"], "wall_s": rec["wall_s"], "comparison": cmp_["rows"],
                      "statistics_bytes_one_block": cmp_["statistics_bytes"],
                      "predicted_reduced_statistics_bytes": cmp_["prediction"]["reduced_statistics_bytes"],
                      "train": {k: max(r["phases"]["train"].get(k) or 0 for r in rec["ranks"])
                                for k in ("seconds_per_step", "cpu_seconds_per_step")},
                      "prune": parts, "baseline_bytes": max(r["baseline"] for r in rec["ranks"])})
    pipes = [{k: v for k, v in r.items() if k not in ("log_tail", "command", "loss_history")} for r in pipe_recs]
    for p_ in pipes:  # the run's peak (rank 0's high-water mark over all phases) against the planner's max of steps
        if p_.get("rc") != 0 or not p_.get("memory"):
            continue
        c = dict(kind="pipeline", shape=p_["shape"], layers=p_["layers"], world=2, seq_len=64, micro_batch=1,
                 calib_samples=4, calib_batch=2, steps=3)  # calibration forwards use train.batch_size rows
        pr = predict(c)
        prune_key = "sparsegpt" if p_["method"] == "sparsegpt" else "foresight_pbs_full"
        # training after the in-loop prune step runs with the masked adapter (prune.mask_final=last_inloop)
        pred = max(pr["train_with_masked_adapter"], pr[prune_key])
        meas = p_["memory"]["peak_rss_mb"] * MiB
        p_["planner_peak_bytes"] = pred
        p_["planner_err_pct"] = 100.0 * (pred - meas) / meas
    from xpert_dist.data import sources  # noqa: F401  (token count below is recorded, not recomputed)
    ext = extrapolate(n_train_tokens=HEALTH_TOKENS)
    not_run = {}
    for sh in ("70b-half", "70b"):
        c = dict(kind="harness", shape=sh, layers=1, world=2, seq_len=64, micro_batch=1, calib_samples=4,
                 calib_batch=1, steps=2)
        pr = predict(c)
        not_run[sh] = {k: pr[k] for k in ("train", "foresight_pbs_full", "sparsegpt", "reduced_statistics_bytes")}
    res = {"micro": micro_recs, "harness": cells, "pipeline": pipes, "extrapolation": ext, "not_run": not_run,
           "health_train_tokens_note": "health training set: 2137 records, 637,556 SmolLM2 tokens (Llama-2's "
                                       "tokenizer is not available offline; taken as the token count)"}
    errs = [abs(r["err_pct"]) for c in cells for r in c["comparison"]]
    res["summary"] = {"max_abs_err_pct": max(errs) if errs else None, "n_predictions": len(errs),
                      "within_15pct": sum(e <= 15 for e in errs)}
    return res


HEALTH_TOKENS = 637556  # measured once with the SmolLM2 tokenizer (see report note)


def _fmt_s(x):
    return "–" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def write(res: dict) -> None:
    _atomic_json(RESULTS / "rehearsal_70b.json", res)
    L = ["# 70B dress rehearsal on CPU (bench/rehearsal_70b/)", "",
         "Shared 2-core CPU machine (load average 15-20 from other work during these runs): wall times are "
         "inflated ~5-10x; CPU seconds (process time of one thread) are the comparable numbers.", ""]
    L += ["## Single matrices at the exact 70B widths (random SPD H = XᵀX of 512 correlated tokens, r = 8, 50%)", "",
          "| matrix | part | CPU s (full rows) | FLOPs | CPU GFLOP/s | peak RSS GiB | note |", "|---|---|---|---|---|---|---|"]
    for m in sorted(res["micro"], key=lambda x: (x["matrix"], PARTS.index(x["part"]))):
        note = f"timed on {m['rows_timed']} rows, scaled" if m["rows_timed"] != m["shape"][0] else ""
        gf = m.get("gflops_per_s")
        L.append(f"| {m['matrix']} {m['shape'][0]}x{m['shape'][1]} | {m['part']} | {_fmt_s(m['cpu_seconds_full_rows'])} | "
                 f"{m['flops']:.3g} | {'–' if not gf else f'{gf:.2f}'} | {m['peak_rss_bytes'] / GiB:.2f} | {note} |")
    L += ["", "Row slices: the time is scaled by out/rows (exact for parts linear in rows; an upper bound for "
          "pbs_full, whose A·H term does not grow with rows). pbs_full_old is the formula before commit bb03721, "
          "(U⊙P)·H. The pbs_full rows were measured after commit 525bf30 (check_finite from the sum, tiled "
          "symmetry check).", ""]
    L += ["", "## Blocks under DeepSpeed ZeRO-3 (2 gloo ranks): measured peak RSS vs `xpert_dist.plan`", "",
          "| shape (h / I / heads q:kv) | layers | phase | measured MiB (max rank) | predicted MiB | error % |",
          "|---|---|---|---|---|---|"]
    for c in res["harness"]:
        sh = SHAPES[c["cell"]["shape"]]
        desc = (f"{c['cell']['shape']} ({sh['hidden_size']} / {sh['intermediate_size']} / "
                f"{sh['num_attention_heads']}:{sh['num_key_value_heads']})")
        for r in c["comparison"]:
            L.append(f"| {desc} | {c['cell']['layers']} | {r['phase']} | {r['measured_bytes'] / MiB:.0f} | "
                     f"{r['predicted_bytes'] / MiB:.0f} | {r['err_pct']:+.1f} |")
    L += ["", "Per-part time of the prune steps (rank 0 / rank 1, CPU s where recorded, else wall s; these cells ran "
          "before commit 525bf30, so their PBS solve times include the entrywise finiteness and strided symmetry "
          "checks that commit made cheaper):", ""]
    for c in res["harness"]:
        for ph, d in c["prune"].items():
            by = d["parts_cpu_seconds_by_rank"] if d["parts_cpu_seconds_by_rank"][0] else d["parts_seconds_by_rank"]
            unit = "CPU s" if d["parts_cpu_seconds_by_rank"][0] else "wall s"
            step_by = [r for r in (d.get("step_cpu_by_rank") if by is d["parts_cpu_seconds_by_rank"] else
                                   d.get("step_wall_by_rank")) or []]
            by = [dict(b, **({"calibration forwards + statistics (step - on_block)":
                              st - b.get("on_block (gather, scores, solve, writes)", 0.0)} if st else {}))
                  for b, st in zip(by, step_by or [None] * len(by))]
            keys = sorted(set().union(*[set(b) for b in by]))
            L.append(f"- {c['cell']['shape']} L{c['cell']['layers']} {ph} ({unit}; step "
                     f"{_fmt_s(d['cpu_seconds_max_rank'] or d['seconds_max_rank'])}): "
                     + "; ".join(f"{k} {' / '.join(_fmt_s(b.get(k, 0.0)) for b in by)}" for k in keys))
    L += ["", "## The real entry point (torchrun, 2 ranks, `launchers/run.py --ds_config ds_configs/zero3.json`)", "",
          "| run | rc | wall s | train s (CPU s) | prune s (CPU s) | peak RSS MiB (rank 0) | planner MiB (error) | export | perplexity |",
          "|---|---|---|---|---|---|---|---|---|"]
    for p_ in res["pipeline"]:
        t = p_.get("timing") or {}
        mem = (p_.get("memory") or {}).get("peak_rss_mb")
        L.append(f"| {p_['key']} | {p_['rc']} | {p_['wall_s']:.0f} | {_fmt_s(t.get('train_s'))} ({_fmt_s(t.get('train_cpu_s'))}) | "
                 f"{_fmt_s(t.get('prune_s'))} ({_fmt_s(t.get('prune_cpu_s'))}) | {_fmt_s(mem)} | "
                 + (f"{p_['planner_peak_bytes'] / MiB:.0f} ({p_['planner_err_pct']:+.1f}%) | " if "planner_peak_bytes" in p_ else "– | ")
                 + f"{', '.join(p_.get('exported') or [])} | {_fmt_s((p_.get('metrics') or {}).get('perplexity'))} |")
    L += ["", "## What did not run here, and why", ""]
    for sh, pr in res["not_run"].items():
        L.append(f"- harness cell `{sh}` (1 block, 2 ranks): the planner predicts "
                 f"{pr['train'] / GiB:.1f} GiB (training), {pr['foresight_pbs_full'] / GiB:.1f} GiB (ForeSight + PBS full "
                 f"prune step) and {pr['sparsegpt'] / GiB:.1f} GiB (SparseGPT) per rank, x 2 ranks, on a 24 GiB machine "
                 "shared with 4 other agents (5-10 GiB available during these runs); CPU time at load 15-20 is the "
                 "second limit (the 1/4-width cell took 15 min wall).")
    done_micro = {(m["matrix"], m["part"]) for m in res["micro"]}
    missing = [f"{mm} {pp}" for mm in MATRICES for pp in PARTS if (mm, pp) not in done_micro]
    if missing:
        L.append("- single-matrix parts not measured (memory guard: predicted peak + 3 GiB headroom was not "
                 "available, or no time left): " + ", ".join(missing) + ".")
    e = res["extrapolation"]
    g = e["gpu_assumptions"]
    L += ["", "## Extrapolation: Llama-2-70B (80 blocks) on 8 x 8 GPUs (arithmetic; GPU constants are assumptions)", "",
          "Assumed per GPU: " + ", ".join(f"{k} = {v}" for k, v in g.items()) + ".", "",
          f"Calibration {e['calibration_tokens']:,} tokens (128 x {e['seq_len']}), split over {e['world']} ranks.", "",
          "| part (per block) | FLOPs | seconds |", "|---|---|---|"]
    fl = e["per_block_flops"]
    fmap = {"calibration forwards (bf16, /W)": fl["calibration forwards"],
            "statistics XᵀX full (fp32, /W)": fl["statistics full"], "statistics diag (fp32, /W)": fl["statistics diag"],
            "PBS full dense solve, A·H first (down_proj owner)": fl["PBS full dense new (down_proj)"],
            "PBS full dense solve, previous (U⊙P)·H (down_proj owner)": fl["PBS full dense previous (down_proj)"],
            "SparseGPT solve (down_proj owner)": fl["SparseGPT (down_proj)"]}
    for k, v in e["per_block_seconds"].items():
        L.append(f"| {k} | {('%.3g' % fmap[k]) if k in fmap else '– (bytes, see assumptions)'} | {v:.3g} |")
    tr = e["training"]
    rd, p_ = e["reduction"], e["world"]
    sb = rd["statistic_bytes"]
    L += ["", "Reduction arithmetic (fp32 statistics, one tree partial per rank; of each rank's "
          f"{p_ - 1} peers {rd['peers_inter_node']} are on other nodes at {g['internode_gb_s_per_gpu']:g} GB/s and "
          f"{rd['peers_intra_node']} on its node at {g['intranode_gb_s']:g} GB/s, links full duplex: "
          f"{rd['peers_inter_node']}/{g['internode_gb_s_per_gpu']:g}e9 + {rd['peers_intra_node']}/"
          f"{g['intranode_gb_s']:g}e9 = {rd['seconds_per_byte_all_peers']:.4g} s per byte sent to every peer). "
          "Statistics per block: " + ", ".join(f"{k} {v / 1e9:.3g} GB" for k, v in sb.items()) + ". "
          f"Reduce-scatter + gather (statistics of at least {rd['scatter_min_bytes'] / MiB:.0f} MiB: "
          + (", ".join(rd["scattered"]) or "none") + "): each rank sends one S/p row chunk to every peer, then "
          f"the owner receives the p - 1 folded chunks, 2·(S/p) per peer: 2 x {sum(sb[k] for k in rd['scattered']) / 1e9:.3g} GB "
          f"/ {p_} x {rd['seconds_per_byte_all_peers']:.4g} = {rd['seconds_per_block_scatter']:.3g} s per block "
          f"(the owner receives {rd['owner_inbound_bytes_per_block_scatter'] / 1e9:.3g} GB per block). The previous "
          f"path sent every rank's whole partial to the owner: down_in alone {sb['down_in'] / 1e9:.3g} GB x "
          f"{rd['seconds_per_byte_all_peers']:.4g} = {rd['seconds_per_block_whole_down_in']:.3g} s per block (the owner "
          f"received {rd['owner_inbound_bytes_per_block_whole_down_in'] / 1e9:.0f} GB); that row is not part of the "
          "step below. The chunk folds (elementwise adds of p chunks of S/p on every rank) are not counted.",
          "", f"One prune step of all 80 blocks: **{e['prune_step_s']['pbs full (statistics full)']:.0f} s** with "
          f"full-Hessian PBS (" + ", ".join(f"{k} {v:.3g} s" for k, v in
                                            sorted(((k, e['per_block_seconds'][k]) for k in e["prune_step_full_parts"]),
                                                   key=lambda kv: -kv[1])) + " per block), "
          f"**{e['prune_step_s']['pbs diagonal / final step (statistics diag)']:.1f} s** with diagonal PBS / the final step.",
          "", f"Training with configs/llama70b_health.yaml on the shipped health data: {tr['train_tokens']:,} tokens "
          "(SmolLM2 tokenizer; Llama-2's is not available offline) -> "
          f"{tr['rows']} rows of {e['seq_len']}, global batch {tr['global_batch']} -> {tr['steps_per_epoch']} step(s) per "
          f"epoch x {tr['epochs']} epochs = {tr['total_steps']} optimizer steps of {tr['step_s']:.1f} s "
          f"({tr['flops_per_token']:.3g} FLOPs/token); in-loop prune steps before steps {tr['inloop_prune_steps']}, "
          "then the final prune step.", "",
          "| variant | time vs plain LoRA | vs LoRA then one prune step | training tokens per epoch for 1.10x |",
          "|---|---|---|---|"]
    for k, v in e["time_ratio"].items():
        L.append(f"| {k} | {v['vs_plain_lora']:.2f}x | {v['vs_lora_then_prune']:.2f}x | "
                 + (f"{e['tokens_for_1.10x'][k] / 1e6:.1f} M |" if e["tokens_for_1.10x"][k] else "never |"))
    (RESULTS / "rehearsal_70b.md").write_text("\n".join(L) + "\n")
