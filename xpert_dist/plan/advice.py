"""Presenting a memory plan: the term-by-term table, and what to change when a step does not fit.

Kept apart from :mod:`.memory` (which computes the terms) so the arithmetic reads on its own.
"""
from __future__ import annotations

from .shapes import GiB
from .spec import Plan, PlanSpec, Term


def suggest(spec: "PlanSpec", terms: list["Term"], peaks: dict, fits: dict) -> list[str]:
    """What to change when a step does not fit: one line per step and memory kind that overflows."""
    out: list[str] = []

    def worst(step, where):
        ts = [t for t in terms if t.step == step and t.where == where]
        return max(ts, key=lambda t: t.bytes) if ts else None

    for step in ("train", "prune"):
        if not fits[step]["accel"]:
            over = peaks[step]["accel"] / GiB - spec.gpu_mem_gb * spec.constants.headroom
            big = worst(step, "accel")
            tips = []
            if step == "train" and not spec.grad_checkpointing:
                tips.append("enable gradient checkpointing")
            if spec.zero_stage < 3:
                tips.append("use --zero-stage 3")
            if spec.offload_optimizer == "none" and spec.zero_stage >= 1:
                tips.append("--offload-optimizer cpu")
            if spec.offload_params == "none" and spec.zero_stage == 3:
                tips.append("--offload-params cpu")
            if step == "prune" and spec.stats_offload == "none" and (spec.pbs in ("full", "shared") or spec.method == "sparsegpt"):
                tips.append("--stats-offload cpu")
            if step == "prune" and spec.pbs == "full":
                tips.append("--pbs shared or diagonal (no per-row Hessian products)")
            if spec.micro_batch > 1:
                tips.append("a smaller --micro-batch")
            tips.append("more nodes (partitioned terms shrink as 1/W)")
            out.append(f"{step} step exceeds GPU memory by {over:.1f} GiB (largest term: {big.name}, "
                       f"{big.bytes / GiB:.1f} GiB): try " + ", ".join(tips))
        if not fits[step]["host"]:
            over = peaks[step]["host_node"] / GiB - spec.host_mem_gb * spec.constants.headroom
            big = worst(step, "host")
            tips = []
            if step == "prune" and spec.stats_offload == "cpu":
                tips.append("--stats-offload disk")
            if spec.offload_params == "cpu":
                tips.append("keep parameters on the GPU (--offload-params none)")
            if step == "prune":
                tips.append("fewer --calib-samples or more nodes (hidden states are per rank)")
            tips.append("fewer GPUs per node sharing the host")
            out.append(f"{step} step exceeds host memory per node by {over:.1f} GiB (largest term: {big.name}, "
                       f"{big.bytes / GiB:.1f} GiB per rank): try " + ", ".join(tips))
    if not out:
        out.append("fits as configured")
    return out


def format_table(plan: "Plan") -> str:
    """The plan as the term-by-term text table that ``python -m xpert_dist.plan`` prints."""
    s, m = plan.spec, plan.spec.model
    lines = [f"Memory plan: {m.name} ({m.total_params() / 1e9:.2f}B params, LoRA r={s.lora_r}: "
             f"{m.lora_params(s.lora_r, s.lora_targets) / 1e6:.1f}M), {s.nodes} node(s) x {s.gpus_per_node} "
             f"{'CPU rank(s)' if s.accelerator == 'cpu' else 'GPU(s)'}, ZeRO-{s.zero_stage}, dtype {s.dtype}, "
             f"seq {s.seq_len} x micro-batch {s.micro_batch}, method {s.method} + PBS {s.pbs}"
             f"{' + OBS reconstruction' if s.reconstruct == 'obs' else ''}"
             f"{' + OBS saliency' if s.saliency == 'obs' else ''}, "
             f"{s.calib_samples} calibration samples, stats offload {s.stats_offload}"]
    for step in ("train", "prune"):
        lines.append("")
        lines.append(f"{'TRAINING STEP' if step == 'train' else 'PRUNE STEP'} (per rank)")
        lines.append(f"  {'term':<52} {'phase':<10} {'where':<6} {'GiB':>9}  formula")
        for t in plan.terms:
            if t.step == step:
                lines.append(f"  {t.name:<52} {t.phase:<10} {t.where:<6} {t.bytes / GiB:>9.3f}  {t.formula}")
        p = plan.peaks[step]
        if s.accelerator != "cpu":
            lines.append(f"  => peak GPU {p['accel'] / GiB:.1f} GiB of {s.gpu_mem_gb:g} "
                         f"({'fits' if plan.fits[step]['accel'] else 'DOES NOT FIT'})")
        lines.append(f"  => peak host {p['host'] / GiB:.2f} GiB per rank, {p['host_node'] / GiB:.1f} GiB per node of "
                     f"{s.host_mem_gb:g} ({'fits' if plan.fits[step]['host'] else 'DOES NOT FIT'})"
                     + (f"; disk {p['disk'] / GiB:.1f} GiB" if p["disk"] else ""))
    lines.append("")
    for sug in plan.suggestions:
        lines.append(f"* {sug}")
    return "\n".join(lines)
