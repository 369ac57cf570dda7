"""``xpert_dist.plan`` predictions for the harness and pipeline cells, and their errors against the measured peaks."""
from __future__ import annotations

from bench.rehearsal_70b.blocks import ALL_RUNS
from bench.rehearsal_70b.common import SHAPES, llama_config

def plan_spec(cell: dict, method: str, pbs: str, model_layers: int | None = None, **over):
    from xpert_dist.plan.memory import PlanSpec
    from xpert_dist.plan.shapes import ModelShape

    cfg = llama_config(cell["shape"], model_layers or cell["layers"])
    shape = ModelShape.from_config(cfg, name=f"{cell['shape']}-{cfg['num_hidden_layers']}L")
    kw = dict(model=shape, nodes=1, gpus_per_node=cell["world"], zero_stage=3, accelerator="cpu",
              dtype="float32", method=method, pbs=pbs, lora_r=8, lora_dropout=0.05, seq_len=cell["seq_len"],
              micro_batch=cell["micro_batch"], calib_samples=cell["calib_samples"],
              calib_batch=cell["calib_batch"], prefetch_bucket_params=50_000_000)
    kw.update(over)
    return PlanSpec(**kw)


def predict(cell: dict) -> dict:
    from xpert_dist.plan.memory import estimate

    fs = estimate(plan_spec(cell, "foresight", "full"))
    # the first prune step starts without EMA scores but creates them block by block: at its last block
    # (where the peak is) the owned ones all exist, so it is predicted with the same terms as the steady state
    fs1 = estimate(plan_spec(cell, "foresight", "full"))
    sg = estimate(plan_spec(cell, "sparsegpt", "off"))
    stats_bytes = sum(t.bytes for t in fs.terms if t.name.startswith("reduced statistics held"))
    # the harness trains before any prune step: dense LoRA, without the masked adapter's terms (the planner adds
    # those for training after the mask is final); CPU case: every term is host, peak = resident + compute
    dense = sum(t.bytes for t in fs.terms if t.step == "train" and t.where == "host"
                and not t.name.startswith("masked")) * fs.spec.constants.cpu_allocator_slack
    return {"train": dense, "train_with_masked_adapter": fs.peaks["train"]["host"],
            "foresight_pbs_full": fs.peaks["prune"]["host"],
            "foresight_pbs_full_first": fs1.peaks["prune"]["host"],
            "sparsegpt": sg.peaks["prune"]["host"], "reduced_statistics_bytes": stats_bytes,
            "terms_foresight": [t.to_dict() for t in fs.terms if t.step == "prune"],
            "terms_sparsegpt": [t.to_dict() for t in sg.terms if t.step == "prune"]}


def statistics_bytes(cell: dict) -> int:
    """Size of one block's full XᵀX statistics (all four input groups, fp32), from the shapes."""
    c = SHAPES[cell["shape"]]
    h, i = c["hidden_size"], c["intermediate_size"]
    q = c["num_attention_heads"] * (h // c["num_attention_heads"])
    return 4 * (h * h + q * q + h * h + i * i)


def compare(rec: dict) -> dict:
    cell = rec["cell"]
    pred = predict(cell)
    rows = []
    runs = cell.get("prune_runs", ALL_RUNS)
    pairs = [("train", "train"), ("foresight_pbs_full_1", "foresight_pbs_full_first"),
             ("foresight_pbs_full_2", "foresight_pbs_full"), ("sparsegpt", "sparsegpt")]
    for phase, key in pairs:
        if phase != "train" and phase not in runs:
            continue
        meas = max(r["phases"][phase]["peak"] for r in rec["ranks"])
        rows.append({"phase": phase, "measured_bytes": meas, "predicted_bytes": pred[key],
                     "err_pct": 100.0 * (pred[key] - meas) / meas})
    return {"rows": rows, "prediction": pred, "statistics_bytes": statistics_bytes(cell)}
