"""EfficientXpert end to end: LoRA fine-tuning with in-loop pruning, final prune, export, evaluation.

``run(cfg)`` is the whole job, the same code path for one process, torchrun, the deepspeed
launcher, srun and submitit (``launchers/run.py`` sets up the process group first). The schedule
(METHOD.md): prune steps at epoch boundaries after the first, or every N optimizer steps, then a
final prune step without EMA and PBS; baselines are the same loop with other settings
(dense LoRA: method none; LoRA→Wanda: schedule final_only; Wanda→LoRA: before_training).
"""
from __future__ import annotations

import gc
import logging
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..distributed.context import DistContext
from ..distributed.zero import partitioned_loading
from ..launch import signals
from ..models import loading, structure as st
from ..models.lora import wrap_lora
from ..prune import distill
from ..prune.adapter import reset_adapters
from ..prune.pruner import Pruner
from ..utils.atomic import atomic_write_json
from . import checkpoint, export, manifest, tracking
from .data import batch_split, build_train_data, calibration_batch, epoch_order, micro_batches, steps_per_epoch
from .engine import Engine, load_ds_config, lr_at, set_threads
from .schedule import plan_prune_steps

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_accelerator_mb() -> float | None:
    """Peak memory allocated by torch on the current CUDA device so far (MiB), None without CUDA."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def memory_marks(marks: dict[str, float]) -> dict:
    """``peak_rss_mb`` plus the high-water mark after each phase, so that a phase's own cost can be read
    off (the mark only rises: a phase raised the peak if its mark exceeds the previous one)."""
    out = {"peak_rss_mb": peak_rss_mb(), **{f"peak_rss_after_{k}_mb": v for k, v in marks.items()}}
    acc = peak_accelerator_mb()
    if acc is not None:
        out["peak_accelerator_mb"] = acc
    return out


def make_context(zero3: bool, offload: str = "none") -> DistContext:
    """The DistContext for this process: multi-rank/ZeRO-3 aware when torch.distributed is up;
    with statistics offload on, calibration partial sums live in host memory."""
    from ..distributed.context import from_environment

    return from_environment(zero3=zero3, partials_device="cpu" if offload != "none" else None)


def preflight(cfg: RunConfig, world_size: int) -> dict | None:
    """Checks that need no model: config files and data exist (cheap), before anything expensive."""
    batch_split(cfg.train, world_size)  # the global batch must split over the ranks (ConfigError)
    ds = load_ds_config(cfg, world_size) if cfg.ds_config else None
    from ..data import sources

    sources.load_records(cfg.data.train, cfg.data.train_split)  # missing / empty -> ConfigError
    if cfg.data.calibration:
        sources.load_records(cfg.data.calibration)
    return ds


def _zero_stage(ds: dict | None) -> int:
    return int((ds or {}).get("zero_optimization", {}).get("stage", 0))


def run(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Train, prune, export and evaluate one run; returns the results dict (also written as JSON)."""
    import torch.distributed as dist

    t_start, cpu_start = time.perf_counter(), time.process_time()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    out = Path(cfg.output_dir)
    ds = preflight(cfg, world)
    set_threads(cfg.train)
    torch.manual_seed(cfg.train.seed)

    # a GGUF source is dequantised once into a plain copy (model.gguf_cache), here before zero.Init (a model built
    # under it would be partitioned); the load below then reads the copy, partitioned under ZeRO-3 like any folder
    loading.gguf_plain_copy(cfg.model)
    # under ZeRO-3 the model is built partitioned; zero.Init is active for this load only
    with partitioned_loading(ds if cfg.model.tiny is None else None):
        model = loading.load_model(cfg.model, seed=cfg.train.seed)
    marks = {"load": peak_rss_mb()}
    st.check_family(model)
    tokenizer = loading.load_tokenizer(cfg.model)
    from ..data.tokenize import model_max_positions

    data = build_train_data(cfg, tokenizer, cfg.model.max_position_embeddings or model_max_positions(model))
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = wrap_lora(model, cfg.lora, quantized=cfg.model.quantization is not None)
    spe = steps_per_epoch(len(data), cfg, world)
    total = spe * cfg.train.epochs if cfg.train.max_steps is None else min(cfg.train.max_steps, spe * cfg.train.epochs)
    plan = plan_prune_steps(cfg.prune, spe, total)
    ctx = make_context(zero3=_zero_stage(ds) == 3, offload=cfg.prune.offload)
    pruner = Pruner(cfg.prune, ctx, batch_size=calibration_batch(cfg.train), progress=progress and rank == 0,
                    work_dir=str(out / "offload"))
    if rank == 0:
        log.info("run %s: %d optimizer steps (%d per epoch), prune steps before %s, world size %d%s",
                 cfg.name, total, spe, list(plan.steps) or "none", world,
                 f", DeepSpeed ZeRO-{_zero_stage(ds)}" if ds else "")
        if cfg.prune.schedule == "steps" and cfg.prune.prune_steps > 0 and cfg.prune.prune_every > 0:
            log.warning("prune.prune_steps=%d places the prune steps; prune.prune_every=%d is not used",
                        cfg.prune.prune_steps, cfg.prune.prune_every)

    before_s = before_cpu = 0.0
    distiller = None  # prune.distill: the teacher is the model as it was just before the first prune step
    if plan.before_training:  # Wanda-then-LoRA: prune the base model once, keep that mask
        distiller = distill.attach(model, cfg.prune)
        c0 = time.process_time()
        before_s = pruner.step(model, data.calibration(0), cfg.prune.sparsity, final=True, use_pbs=False).seconds
        before_cpu = time.process_time() - c0
    restarts = plan.steps if cfg.prune.lr_rewind else ()  # the schedule starts again after each in-loop prune
    engine = Engine(model, cfg, total, world, lr_restarts=restarts)
    model = engine.module

    state = checkpoint.resume(out, model, engine, pruner, ctx, cfg)
    step = resumed_at = state.get("step", 0)
    distill.check_resume(cfg.prune, plan.steps[0] if plan.steps else None, step)
    if plan.frozen_before(step):  # the final mask was chosen before training (or before the resume point)
        pruner.freeze(model)
    history: list[list[float]] = state.get("loss_history", [])
    prune_at = dict(zip(plan.steps, plan.sparsities))
    t_train, cpu_train = time.perf_counter(), time.process_time()
    prune_seconds, prune_cpu = before_s, before_cpu
    tracker = tracking.open_tracker(cfg, rank, logged=len(pruner.reports) if step else 0, prune_seconds=prune_seconds)
    bar = tqdm(total=total, initial=step, desc="train", disable=not (progress and rank == 0))
    step_seconds: list[list[float]] = []  # [step, wall s] of each optimizer step this process ran (no prune step)
    while step < total:
        if step in prune_at:  # checkpoints are taken after a step, so a resumed run has not done this one
            ctx.phase(f"prune step before optimizer step {step + 1}")
            c0 = time.process_time()
            distiller = distiller or distill.attach(model, cfg.prune)
            prune_seconds += pruner.step(model, data.calibration(plan.steps.index(step)), prune_at[step],
                                         freeze=step == plan.mask_final_at).seconds
            if cfg.prune.adapter_reset:  # A re-initialised, B = 0, their optimizer moments zeroed
                reset_adapters(model, engine, ctx, seed=cfg.train.seed * 1_000_003 + step)
            prune_cpu += time.process_time() - c0
        ctx.phase(f"training step {step + 1}")
        epoch, in_epoch = divmod(step, spe)
        order = epoch_order(len(data), epoch, cfg.train.seed)
        batch = micro_batches(data, order, in_epoch, cfg, rank, world)
        t_step = time.perf_counter()
        loss = engine.step(batch)
        step += 1
        step_seconds.append([step, time.perf_counter() - t_step])
        history.append([step, loss])
        tracker.step(step, loss, lr_at(step - 1, cfg, total, restarts), batch, world, pruner.reports, prune_seconds)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if rank == 0 and (step % cfg.train.log_every == 0):
            log.info("step %d/%d loss %.4f", step, total, loss)
        stop = signals.stop_requested()  # collective: every rank polls at the same point
        if stop or checkpoint.periodic_due(cfg, step, total):
            checkpoint.save(out, step, model, engine, pruner, ctx, history, stop=stop, cfg=cfg)
    bar.close()
    if distiller is not None:
        distiller.remove()  # frees the teacher before the final step and the export
    train_seconds = time.perf_counter() - t_train - (prune_seconds - before_s)
    train_cpu = time.process_time() - cpu_train - (prune_cpu - before_cpu)
    marks["train"] = peak_rss_mb()

    # final prune step: no EMA, no PBS; Wanda-then-LoRA re-applies its original mask after merging;
    # a mask that was final before only has its exact sparsity verified (the adapter trained masked)
    ctx.phase("final prune")
    if cfg.prune.method != "none" and plan.mask_final_at is not None:
        c0 = time.process_time()
        prune_seconds += pruner.verify(model, cfg.prune.sparsity).seconds
        prune_cpu += time.process_time() - c0
    elif cfg.prune.method != "none":
        fixed = pruner.masks.copy() if plan.before_training else None
        c0 = time.process_time()
        rep = pruner.step(model, data.calibration(len(plan.steps)), cfg.prune.sparsity, final=True,
                          fixed_masks=fixed)
        prune_seconds += rep.seconds
        prune_cpu += time.process_time() - c0
    pruner.drop_smoothed_scores()  # they served the in-loop steps only (frees memory / offload files)
    try:
        (out / "offload").rmdir()  # the default offload folder, if it is now empty (ranks may race: fine)
    except OSError:
        pass
    marks["final_prune"] = peak_rss_mb()
    tracker.close(pruner.reports, total)  # the final prune step's figures, at the last step
    timing = {"train_s": train_seconds, "prune_s": prune_seconds, "total_s": time.perf_counter() - t_start,
              # process CPU time (all threads): less sensitive to other load than wall time
              "train_cpu_s": train_cpu, "prune_cpu_s": prune_cpu, "total_cpu_s": time.process_time() - cpu_start}
    results = export_run(cfg, model, tokenizer, pruner, ctx, history, plan, timing, rank=rank, world=world,
                         marks=marks)
    # wall seconds per optimizer step this process ran (a resumed run: those after the resume point), so that a
    # benchmark can split training into its dense-adapter and masked-adapter phases (bench/method_table/timing.py)
    results["step_seconds"] = step_seconds
    results["timed_from_step"] = resumed_at  # 0, or the resume point: the timings above cover the steps after it
    # only the exported checkpoint is evaluated: drop the training copy first (lower evaluation peak)
    del model, engine
    gc.collect()
    return evaluate_and_record(cfg, results, tokenizer, pruner, ctx, data, history, rank)


def export_run(cfg, model, tokenizer, pruner, ctx, history, plan, timing, rank, world, marks=None) -> dict:
    """Merge, check sparsity, export (checkpoint, masks, adapter); returns the results without metrics."""
    out = Path(cfg.output_dir)
    ctx.phase("export: merging (every rank gathers)")
    sd = export.merged_state_dict(model, ctx)
    expected = {n: cfg.prune.sparsity for n in pruner.masks} if cfg.prune.pattern == "unstructured" \
        and cfg.prune.allocation == "uniform" else None
    sparsity = export.check_sparsity(sd, pruner.masks, expected)
    results = {"name": cfg.name, "config": cfg.to_dict(), "world_size": world,
               "loss_history": history, "prune_steps": list(plan.steps), "sparsity": sparsity,
               "prune_reports": [r.__dict__ for r in pruner.reports], "timing": timing,
               "memory": memory_marks({**(marks or {}), "export_merge": peak_rss_mb()})}
    with ctx.one_rank("export: writing the checkpoint"):  # rank 0 only: no collective may run inside
        if rank == 0:
            export.save_hf_checkpoint(sd, model, tokenizer, out / "model")
            if pruner.masks:
                export.save_masks(pruner.masks, out / "masks.safetensors")
    ctx.wait_for("export: writing the checkpoint")
    if cfg.train.keep_adapter:
        ctx.phase("export: adapter (every rank gathers)")
        export.save_adapter(model, ctx, out / "adapter")
    del sd
    ctx.barrier(after="export")
    return results


def evaluate_and_record(cfg, results, tokenizer, pruner, ctx, data, history, rank) -> dict:
    """Evaluate the exported model (rank 0), write results.json, the manifest and the report."""
    out = Path(cfg.output_dir)
    # rank 0 only, and it may outlast the collective timeout: the others wait on its heartbeat
    with ctx.one_rank("evaluation and report"):
        if rank == 0:
            _evaluate_and_write(cfg, results, tokenizer, pruner, data, history, out)
    ctx.wait_for("evaluation and report")
    return results


def _evaluate_and_write(cfg, results, tokenizer, pruner, data, history, out: Path) -> None:
    """Rank 0: evaluate the exported checkpoint, write results.json, the manifest and the report."""
    results["metrics"] = evaluate_export(cfg, out / "model", tokenizer)
    from ..eval.reference import references  # base model (cached) and dense-LoRA run, for the report

    results["reference"] = references(cfg, tokenizer)
    results["final_loss"] = history[-1][1] if history else None
    atomic_write_json(out / "results.json", results)
    manifest.write(out, cfg, results, pruner, data.sha256)
    try:
        from ..report.markdown import write_run_report

        write_run_report(out)
    except ImportError:  # report package optional at import time
        pass
    log.info("run %s finished: report %s", cfg.name, out / "report.md")


def evaluate_export(cfg: RunConfig, model_dir: Path, tokenizer) -> dict:
    """Reload the exported checkpoint with plain transformers and evaluate it (proves it loads)."""
    from transformers import AutoModelForCausalLM

    from ..eval.retention import evaluate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return evaluate(model, tokenizer, cfg)
