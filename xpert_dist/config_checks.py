"""The checks ``config.validate`` runs once, at the edge, on a built ``RunConfig``: every field's allowed
values and the combinations that are refused, each ConfigError naming the field. Also the allowed-value
lists other modules read (``LLAMA_LINEARS``, ``PRUNE_METHODS``...); ``config`` re-exports all of them."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRUNE_METHODS = ("none", "magnitude", "wanda", "sparsegpt", "foresight")
SCHEDULES = ("epoch", "steps", "final_only", "before_training")
PBS_FORMS = ("off", "diagonal", "full", "shared")
PROPAGATE = ("pruned", "unpruned", "pruned_first", "true_sequential")
DISTILL_MODES = ("off", "logits", "squarehead", "logits+squarehead")  # prune/distill.py


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


def _boolean(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{name}={value!r} must be a {'non-negative' if allow_zero else 'positive'} number")


def mask_final_fraction(value: str) -> float | None:
    """``prune.mask_final`` -> the fraction of training at which the mask becomes final, or None for
    ``end`` / ``last_inloop`` (decided by the schedule); ConfigError naming the field otherwise."""
    if value in ("end", "last_inloop"):
        return None
    if isinstance(value, str) and value.startswith("fraction:"):
        try:
            f = float(value.split(":", 1)[1])
        except ValueError:
            f = -1.0
        if 0.0 <= f < 1.0:
            return f
    raise ConfigError(f"prune.mask_final={value!r} is not one of end, last_inloop, fraction:<f> with 0 <= f < 1")


def validate(cfg: RunConfig) -> None:
    """Check every field once; raise ConfigError naming the first bad one."""
    p, t, d, lo, m, e = cfg.prune, cfg.train, cfg.data, cfg.lora, cfg.model, cfg.eval
    _choice("prune.method", p.method, PRUNE_METHODS)
    if not isinstance(p.sparsity, (int, float)) or not 0.0 <= float(p.sparsity) < 1.0:
        raise ConfigError(f"prune.sparsity={p.sparsity!r} must be in [0, 1)")
    if p.pattern != "unstructured":
        try:
            n, mm = (int(x) for x in str(p.pattern).split(":"))
        except ValueError:
            raise ConfigError(f"prune.pattern={p.pattern!r} must be 'unstructured' or 'N:M' like 2:4") from None
        if not 0 < n < mm:
            raise ConfigError(f"prune.pattern={p.pattern!r}: need 0 < N < M")
        if abs((1 - n / mm) - p.sparsity) > 1e-9 and p.method != "none":
            raise ConfigError(f"prune.pattern={p.pattern} implies sparsity {1 - n / mm:g}, "
                              f"but prune.sparsity={p.sparsity}")
    _choice("prune.group", p.group, ("output", "input", "layer"))
    _choice("prune.variant", p.variant, ("exact", "reference"))
    _choice("prune.allocation", p.allocation, ("uniform", "owl"))
    _choice("prune.pbs", p.pbs, PBS_FORMS)
    _choice("prune.pbs_support", p.pbs_support, ("dense", "kept"))
    _choice("prune.schedule", p.schedule, SCHEDULES)
    _choice("prune.ramp", p.ramp, ("constant", "cubic"))
    _choice("prune.stats_dtype", p.stats_dtype, ("float32", "float64"))
    _choice("prune.solver_dtype", p.solver_dtype, ("float32", "float64"))
    _choice("prune.offload", p.offload, ("none", "cpu", "disk"))
    _choice("prune.ema_dtype", p.ema_dtype, ("float32", "bfloat16"))
    if not 0.0 < p.ema_eta <= 1.0:
        raise ConfigError(f"prune.ema_eta={p.ema_eta} must be in (0, 1]")
    mask_final_fraction(p.mask_final)  # ConfigError on a bad value
    _choice("prune.pbs_order", p.pbs_order, ("adapter", "base"))
    _choice("prune.reconstruct", p.reconstruct, ("off", "obs"))
    _choice("prune.masked_grad_dtype", p.masked_grad_dtype, ("auto", "bfloat16"))
    _choice("prune.masked_grad", p.masked_grad, ("exact", "straight_through"))
    if p.masked_grad == "straight_through" and p.masked_grad_dtype != "auto":
        raise ConfigError(f"prune.masked_grad_dtype={p.masked_grad_dtype} sets the dtype of the weight-gradient "
                          "matmul that prune.masked_grad=straight_through does not compute; drop one of them")
    _choice("prune.calib_dtype", p.calib_dtype, ("auto", "bfloat16"))
    _boolean("prune.lr_rewind", p.lr_rewind)
    _boolean("prune.adapter_reset", p.adapter_reset)
    _choice("prune.propagate", p.propagate, PROPAGATE)
    if p.propagate == "true_sequential" and set(p.modules) != set(LLAMA_LINEARS):
        raise ConfigError(f"prune.propagate=true_sequential calibrates a block group by group and prunes all seven "
                          f"linears; prune.modules={list(p.modules)} leaves some out")
    _choice("prune.saliency", p.saliency, ("diag", "obs"))
    _positive("prune.hessian_carry", p.hessian_carry, allow_zero=True)
    if not p.hessian_carry <= 1.0:
        raise ConfigError(f"prune.hessian_carry={p.hessian_carry} must be in [0, 1]")
    if p.hessian_carry > 0 and not p.solves_with_full_xtx():
        raise ConfigError(f"prune.hessian_carry={p.hessian_carry} carries the full XᵀX a prune step solves with; "
                          f"prune.reconstruct={p.reconstruct}, prune.method={p.method}, prune.pbs={p.pbs}, "
                          f"prune.saliency={p.saliency} use none")
    if p.saliency != "diag" and p.method != "foresight":
        raise ConfigError(f"prune.saliency={p.saliency} rescales ForeSight's score; prune.method={p.method} "
                          "has another score (sparsegpt selects with its own OBS saliency): use prune.method=foresight")
    inloop = p.schedule in ("epoch", "steps")
    if p.method == "sparsegpt" and p.pbs != "off" and inloop:
        raise ConfigError("prune.method=sparsegpt with in-loop prune steps and prune.pbs compensates twice "
                          "(PBS targets what SparseGPT's update already reconstructed): set prune.pbs=off")
    if p.reconstruct != "off" and (p.method == "sparsegpt" or p.pbs != "off"):
        raise ConfigError(f"prune.reconstruct={p.reconstruct} compensates the pruned weights a second time with "
                          f"prune.method={p.method} / prune.pbs={p.pbs}: use one of them (prune.reconstruct=off, "
                          f"or prune.pbs=off with prune.method other than sparsegpt)")
    _choice("prune.distill", p.distill, DISTILL_MODES)
    _positive("prune.distill_weight", p.distill_weight)
    if p.distill != "off" and (cfg.ds_config is not None or cfg.model.quantization is not None):
        raise ConfigError("prune.distill is implemented for plain torch with an unquantised base "
                          "(no ds_config, no model.quantization)")
    if p.adapter_reset and p.pbs != "off" and p.pbs_order == "adapter":
        raise ConfigError("prune.adapter_reset=true re-initialises A, which would void PBS's update of B "
                          "(computed for the old A): use prune.pbs_order=base or prune.pbs=off")
    if p.prune_steps < 0:
        raise ConfigError(f"prune.prune_steps must be >= 0, got {p.prune_steps}")
    if p.schedule == "steps" and p.prune_every <= 0 and p.prune_steps <= 0:
        raise ConfigError("prune.schedule=steps needs prune.prune_every > 0 or prune.prune_steps > 0")
    if p.allocation == "owl" and p.pattern != "unstructured":
        raise ConfigError("prune.allocation=owl works only with prune.pattern=unstructured")
    _positive("prune.owl_lambda", p.owl_lambda, allow_zero=True)
    _positive("prune.owl_m", p.owl_m)
    if not p.owl_lambda < 1:
        raise ConfigError(f"prune.owl_lambda={p.owl_lambda!r} must be below 1 (a spread of layer sparsities)")
    bad = sorted(set(p.modules) - set(LLAMA_LINEARS))
    if bad:
        raise ConfigError(f"prune.modules: unknown module name(s) {bad}; known: {LLAMA_LINEARS}")
    bad = sorted(set(lo.target_modules) - set(LLAMA_LINEARS))
    if bad:
        raise ConfigError(f"lora.target_modules: unknown module name(s) {bad}; known: {LLAMA_LINEARS}")
    _positive("lora.r", lo.r)
    _positive("lora.alpha", lo.alpha)
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.dropout={lo.dropout} must be in [0, 1)")
    _choice("model.dtype", m.dtype, ("float32", "bfloat16", "float16"))
    _choice("model.quantization", m.quantization, (None, "4bit", "8bit"))
    _choice("data.format", d.format, ("auto", "text", "prompt_completion"))
    for name in ("seq_len", "calib_samples", "calib_sets"):
        _positive(f"data.{name}", getattr(d, name))
    if not isinstance(d.calib_sets, int):
        raise ConfigError(f"data.calib_sets={d.calib_sets!r} must be a whole number of draws")
    if d.calib_seq_len is not None:
        _positive("data.calib_seq_len", d.calib_seq_len)
    for name in ("epochs", "batch_size"):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("micro_batch_size", "threads"):
        if getattr(t, name) is not None:
            _positive(f"train.{name}", getattr(t, name))
    if t.micro_batch_size is not None and t.batch_size % t.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} does not divide "
                          f"train.batch_size={t.batch_size} (the global batch)")
    _boolean("train.reproducible", t.reproducible)
    if t.reproducible and cfg.ds_config is not None:
        raise ConfigError(f"train.reproducible=true needs plain torch data parallelism, not ds_config="
                          f"{cfg.ds_config}: DeepSpeed reduces gradients in an order that depends on the world size")
    _positive("train.lr", t.lr)
    if t.max_steps is not None:  # 0: no training, the final step prunes the loaded model one-shot (post-hoc)
        _positive("train.max_steps", t.max_steps, allow_zero=True)
        if t.max_steps == 0 and cfg.prune.schedule not in ("final_only", "before_training"):
            raise ConfigError(f"train.max_steps=0 (no training) needs prune.schedule=final_only or before_training, "
                              f"not {cfg.prune.schedule!r}: there are no steps to prune in")
    _positive("train.checkpoint_every", t.checkpoint_every, allow_zero=True)
    for task in e.tasks:
        _choice("eval.tasks", task, ("pubmedqa", "casehold"))
    _positive("eval.perplexity_windows", e.perplexity_windows, allow_zero=True)
    _positive("eval.perplexity_seq_len", e.perplexity_seq_len)
    _boolean("eval.base_reference", e.base_reference)
    _boolean("train.tensorboard", t.tensorboard)
    if e.reference_run is not None and not (Path(e.reference_run) / "results.json").is_file():
        raise ConfigError(f"eval.reference_run={e.reference_run}: no results.json there (not a finished run)")
    _choice("domain", cfg.domain, ("health", "legal", "general", "custom"))
    if cfg.ds_config is not None and not Path(cfg.ds_config).is_file():
        raise ConfigError(f"ds_config file {cfg.ds_config} does not exist")
