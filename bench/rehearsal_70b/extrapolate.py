"""Extrapolation of one prune step and the training run to Llama-2-70B (80 blocks) on 8 x 8 GPUs:
FLOP and byte counts divided by named, *assumed* GPU and network throughputs."""
from __future__ import annotations

from pathlib import Path

from bench.rehearsal_70b.common import REPO

# GPU constants: ASSUMPTIONS (no GPU measured them here); named so the arithmetic can be redone.
GPU = {"name": "H100-SXM-80GB (README's 8 nodes x 8 GPUs plan)",
       "bf16_tflops_effective": 400.0,  # 989 peak dense bf16 x ~40% MFU (training and calibration forwards)
       "fp32_tflops_effective": 50.0,  # 67 peak fp32 without TF32 (torch's default "highest" precision) x 75%
       "hbm_gb_s_effective": 2000.0,  # 3.35 TB/s peak x 60% (elementwise scores, masks, writes)
       "bytes_per_weight_elementwise": 64.0,  # ForeSight scores + EMA + mask sort + writes, per weight
       "internode_gb_s_per_gpu": 50.0,  # 400 Gb/s NIC per GPU
       "intranode_gb_s": 450.0}  # NVLink


def extrapolate(cfg_path: Path = REPO / "configs" / "llama70b_health.yaml", world: int = 64,
                gpus_per_node: int = 8, global_batch: int | None = None, n_train_tokens: int | None = None) -> dict:
    """One prune step of Llama-2-70B (80 blocks) and the whole training run of ``cfg_path`` on
    ``world`` GPUs, as FLOP/byte counts divided by the assumed throughputs in ``GPU``."""
    import yaml

    from xpert_dist.plan.shapes import ModelShape
    from xpert_dist.train.schedule import plan_prune_steps
    from xpert_dist.config import PruneConfig

    y = yaml.safe_load(cfg_path.read_text())
    m = ModelShape.load("llama2_70b")
    S = int(y["data"]["seq_len"])
    n_cal = int(y["data"]["calib_samples"])
    T = n_cal * S
    r = int(y["lora"]["r"])
    shapes = m.linear_shapes()
    P_blk = m.block_linear_params()
    P_lin = m.layers * P_blk + m.vocab * m.hidden  # matmul parameters (blocks + LM head)
    bf, f32 = GPU["bf16_tflops_effective"] * 1e12, GPU["fp32_tflops_effective"] * 1e12
    attn_fwd_tok = 4.0 * S * m.q_dim  # QKᵀ and AV per token per layer (no causal saving)
    # ---- prune step, per block (calibration split over all ranks; solves on module owners)
    fwd = 2 * T * (2.0 * P_blk + attn_fwd_tok)  # two forwards per block (statistics, then recompute)
    dims = m.group_dims()
    stats_full = 2.0 * T * sum(d * d for d in dims.values())
    stats_diag = 2.0 * T * sum(dims.values())
    pbs_new = {n: 2.0 * r * i * i + 4.0 * o * i * r for n, (o, i) in shapes.items()}
    pbs_old = {n: 2.0 * o * i * i + 2.0 * o * i * r for n, (o, i) in shapes.items()}
    sgpt = {n: 4.0 / 3.0 * i ** 3 + 1.0 * o * i * i for n, (o, i) in shapes.items()}
    # ---- reduction of the full statistics to their owners (fp32, one tree partial per rank: the
    # calibration rows of a rank are one aligned run of the canonical tree). Per rank, of its p-1 peers
    # n_inter are on other nodes (the GPU's NIC) and n_intra on its node (NVLink); links full duplex.
    from xpert_dist.distributed.multirank import SCATTER_MIN_BYTES, SCATTER_MIN_WORLD

    n_inter = world - gpus_per_node
    n_intra = gpus_per_node - 1
    s_per_byte = n_inter / (GPU["internode_gb_s_per_gpu"] * 1e9) + n_intra / (GPU["intranode_gb_s"] * 1e9)
    stat_bytes = {g: d * d * 4 for g, d in dims.items()}
    big = max(stat_bytes.values())
    # previous path: every rank sends its whole partial to the owner, which receives (p-1)·S; the
    # largest statistic (down_in) alone, as reported before
    reduce_whole_s = big * s_per_byte
    # reduce-scatter + gather (distributed/scatter_reduce.py) for statistics >= SCATTER_MIN_BYTES: each rank
    # sends one S/p row chunk to every peer and receives one from every peer, then the owner receives
    # the p-1 folded chunks: 2·(S/p)·(n_inter/B_inter + n_intra/B_intra) per statistic, the block's
    # statistics one after another; smaller ones (none at 70B) travel whole
    scattered = {g: b for g, b in stat_bytes.items() if b >= SCATTER_MIN_BYTES and world >= SCATTER_MIN_WORLD}
    reduce_s = (sum(2.0 * b / world for b in scattered.values())
                + sum(b for g, b in stat_bytes.items() if g not in scattered)) * s_per_byte
    reduction = {"statistic_bytes": stat_bytes, "scattered": sorted(scattered), "peers_inter_node": n_inter,
                 "peers_intra_node": n_intra, "seconds_per_byte_all_peers": s_per_byte,
                 "owner_inbound_bytes_per_block_whole_down_in": (world - 1) * big,
                 "owner_inbound_bytes_per_block_scatter": sum(2.0 * (world - 1) / world * b for b in scattered.values()),
                 "seconds_per_block_scatter": reduce_s, "seconds_per_block_whole_down_in": reduce_whole_s,
                 "scatter_min_bytes": SCATTER_MIN_BYTES}
    elementwise_s = P_blk * GPU["bytes_per_weight_elementwise"] / (GPU["hbm_gb_s_effective"] * 1e9)
    blk = {"calibration forwards (bf16, /W)": fwd / world / bf,
           "statistics XᵀX full (fp32, /W)": stats_full / world / f32,
           "statistics diag (fp32, /W)": stats_diag / world / f32,
           "reduction of full XᵀX to owners (reduce-scatter + gather, all 4 statistics)": reduce_s,
           "reduction, previous path: whole partials to the owner (down_in only)": reduce_whole_s,
           "scores + mask + writes (elementwise, largest owner: all)": elementwise_s,
           "PBS full dense solve, A·H first (down_proj owner)": pbs_new["down_proj"] / f32,
           "PBS full dense solve, previous (U⊙P)·H (down_proj owner)": pbs_old["down_proj"] / f32,
           "SparseGPT solve (down_proj owner)": sgpt["down_proj"] / f32}
    full_parts = ["calibration forwards (bf16, /W)", "statistics XᵀX full (fp32, /W)",
                  "reduction of full XᵀX to owners (reduce-scatter + gather, all 4 statistics)",
                  "scores + mask + writes (elementwise, largest owner: all)",
                  "PBS full dense solve, A·H first (down_proj owner)"]
    step_full = m.layers * sum(blk[k] for k in full_parts)
    step_diag = m.layers * (blk["calibration forwards (bf16, /W)"] + blk["statistics diag (fp32, /W)"]
                            + blk["scores + mask + writes (elementwise, largest owner: all)"])
    # ---- training
    tok = n_train_tokens
    B = global_batch or max(world, int(y["train"].get("batch_size", 1)))
    rows = tok // S
    spe = max(1, rows // B)
    epochs = int(y["train"].get("epochs", 1))
    total = spe * epochs
    flops_tok = 3.0 * (2.0 * P_lin + attn_fwd_tok * m.layers)  # forward + recompute + input-grad backward
    step_tokens = B * S
    train_step_s = step_tokens * flops_tok / world / bf
    pc = PruneConfig(**{k: v for k, v in y["prune"].items() if k in PruneConfig.__dataclass_fields__})
    plan = plan_prune_steps(pc, spe, total)
    n_inloop = len(plan.steps)
    train_s = total * train_step_s
    out = {"gpu_assumptions": GPU, "world": world, "calibration_tokens": T, "seq_len": S,
           "per_block_seconds": blk, "reduction": reduction, "prune_step_full_parts": full_parts,
           "per_block_flops": {"calibration forwards": fwd, "statistics full": stats_full, "statistics diag": stats_diag,
                               "PBS full dense new (down_proj)": pbs_new["down_proj"],
                               "PBS full dense previous (down_proj)": pbs_old["down_proj"],
                               "SparseGPT (down_proj)": sgpt["down_proj"],
                               "PBS full new (all 7)": sum(pbs_new.values()), "PBS full previous (all 7)": sum(pbs_old.values())},
           "prune_step_s": {"pbs full (statistics full)": step_full, "pbs diagonal / final step (statistics diag)": step_diag},
           "training": {"train_tokens": tok, "rows": rows, "global_batch": B, "steps_per_epoch": spe, "epochs": epochs,
                        "total_steps": total, "flops_per_token": flops_tok, "step_s": train_step_s, "train_s": train_s,
                        "inloop_prune_steps": list(plan.steps), "final_prune_step": True,
                        "config_batch_size": y["train"].get("batch_size")}}
    ratios = {}
    for name, inloop in (("pbs diagonal (shipped in configs/llama70b_health.yaml)", step_diag),
                         ("pbs full", step_full)):
        ex = train_s + n_inloop * inloop + step_diag  # + the final prune (no PBS: diagonal statistics)
        ratios[name] = {"vs_plain_lora": ex / train_s, "vs_lora_then_prune": ex / (train_s + step_diag)}
    out["time_ratio"] = ratios
    # how many training tokens make the shipped schedule (1 in-loop + final) stay within 1.10x of plain LoRA
    per_tok = flops_tok / world / bf
    for name, inloop in (("pbs diagonal", step_diag), ("pbs full", step_full)):
        out.setdefault("tokens_for_1.10x", {})[name] = (n_inloop * inloop + step_diag) / (0.10 * per_tok * epochs)
    return out
