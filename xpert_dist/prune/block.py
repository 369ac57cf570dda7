"""Prune one decoder block: scores, masks and adapter updates from effective weights and statistics.

Pure with respect to models: takes tensors (effective weights U, LoRA A, statistics) and returns
tensors (keep masks, new base weights, new LoRA B). The stateful parts (EMA of scores, writing
into a model, distribution) live in ``pruner.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PruneConfig
from ..errors import ConfigError
from ..maths import consumers, masks, pbs, reconstruct, scores, sparsegpt
from ..stats.capture import InputStats
from ..models.structure import INPUT_GROUPS

# what statistics each method needs


def stats_mode(cfg: PruneConfig) -> str | None:
    """'full', 'diag' or None (magnitude needs no calibration)."""
    if cfg.solves_with_full_xtx():
        return "full"
    if cfg.method in ("wanda", "foresight") or cfg.pbs == "diagonal":
        return "diag"
    return None


@dataclass
class ModuleInput:
    """Everything needed to prune one linear: its effective weight and, if LoRA-wrapped, A and scale."""

    U: torch.Tensor
    A: torch.Tensor | None = None
    scale: float = 0.0


@dataclass
class ModuleResult:
    keep: torch.Tensor  # bool [out, in], True = keep
    weight: torch.Tensor  # new base weight: U ⊙ keep (or SparseGPT's reconstruction)
    delta_B: torch.Tensor | None = None  # new LoRA B (PBS), None: B reset to zero
    score: torch.Tensor | None = None  # the (unsmoothed) score, for EMA / analysis
    rewritten: bool = False  # weight is not U ⊙ keep (SparseGPT, reconstruction, PBS into the base)


def block_scores(cfg: PruneConfig, inputs: dict[str, ModuleInput], stats: dict[str, InputStats] | None,
                 n_heads: int, n_kv_heads: int, next_U: dict[str, torch.Tensor] | None = None,
                 norms: dict[str, torch.Tensor] | None = None,
                 targets: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Scores of the ``targets`` modules (default: all of ``inputs``; higher = more important).

    ``inputs`` may hold more modules than are pruned: ForeSight reads consumers' weights too.
    """
    norms = norms or {}
    U = {n: m.U for n, m in inputs.items()}
    targets = targets or list(U)
    if cfg.method == "magnitude":
        return {n: scores.magnitude_scores(U[n]) for n in targets}
    if stats is None:
        raise ConfigError(f"prune.method={cfg.method} needs calibration statistics")
    d = {n: stats[INPUT_GROUPS[n]].diag for n in targets}
    if cfg.method == "wanda":
        return {n: scores.wanda_scores(U[n], d[n]) for n in targets}
    if cfg.method == "foresight":
        if cfg.variant == "reference":
            n_tokens = stats[INPUT_GROUPS[targets[0]]].n
            ref = consumers.foresight_reference_scores(U, d, n_tokens, n_heads, n_kv_heads)
            return {n: ref[n] for n in targets}
        c = consumers.consumer_factors(U, n_heads, n_kv_heads, next_U=next_U,
                                       mlp_norm_weight=norms.get("mlp"),
                                       next_attn_norm_weight=norms.get("next_attn"),
                                       next_mlp_norm_weight=norms.get("next_mlp"))
        return {n: scores.foresight_scores(U[n], d[n], c[n]) for n in targets}
    raise ConfigError(f"prune.method={cfg.method!r} has no score (SparseGPT selects its own mask)")


def choose_mask(cfg: PruneConfig, score: torch.Tensor, sparsity: float) -> torch.Tensor:
    pattern = masks.parse_pattern(cfg.pattern)
    if pattern is not None:
        return masks.nm_mask(score, *pattern)
    return masks.select_mask(score, sparsity, group=cfg.group)


def adapter_update(cfg: PruneConfig, inp: ModuleInput, keep: torch.Tensor, st: InputStats,
                   support: str | None = None) -> torch.Tensor | None:
    """PBS update of B (or None when PBS is off or the module has no adapter)."""
    if cfg.pbs == "off" or inp.A is None:
        return None
    A = inp.A.float()
    if cfg.pbs == "diagonal":
        return pbs.pbs_diagonal(inp.U, A, keep, st.diag.float(), inp.scale,
                                kappa=cfg.pbs_kappa, lam=cfg.pbs_lambda)
    if cfg.pbs == "full":
        return pbs.pbs_full(inp.U, A, keep, st.hessian.float(), inp.scale, lam=cfg.pbs_lambda,
                            support=support or cfg.pbs_support)
    return pbs.pbs_shared_gram(inp.U, A, keep, st.hessian.float(), inp.scale, lam=cfg.pbs_lambda)


def reconstruct_factor(cfg: PruneConfig, st: InputStats) -> torch.Tensor | None:
    """The ``prune.reconstruct=obs`` factor of one input group's ``XᵀX`` (shared by the modules that
    read that input: q/k/v, gate/up), so that a caller computes it once per group."""
    return reconstruct.obs_factor(st.hessian.float(), percdamp=cfg.sparsegpt_percdamp,
                                  dtype=getattr(torch, cfg.solver_dtype))


def compensate(cfg: PruneConfig, inp: ModuleInput, keep: torch.Tensor, st: InputStats, masked_after: bool = False,
               factor: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(new base weight or None for ``U ⊙ keep``, new B or None for 0): what compensates the pruned
    weights, chosen by ``prune.reconstruct`` and ``prune.pbs``/``prune.pbs_order`` (config validation
    refuses combining two of them). ``masked_after``: the mask is final and the adapter will train
    masked, so an adapter-order ``pbs=full`` update is solved for the kept support it will act on.
    ``factor``: :func:`reconstruct_factor` of ``st`` when the caller already has it."""
    if cfg.reconstruct == "obs":  # column blocks only set rounding and speed here, not the result (no mask choice)
        return reconstruct.obs_reconstruct(inp.U, st.hessian.float(), keep, percdamp=cfg.sparsegpt_percdamp,
                                           dtype=getattr(torch, cfg.solver_dtype), factor=factor), None
    if cfg.pbs_order == "adapter" or cfg.pbs == "off" or inp.A is None:
        return None, adapter_update(cfg, inp, keep, st, support="kept" if masked_after else None)
    dB = adapter_update(cfg, inp, keep, st, support="kept")  # authors' order: the correction lands in the base
    return pbs.pbs_into_base(inp.U, inp.A.float(), keep, dB, inp.scale, cfg.pbs), None


def prune_module(cfg: PruneConfig, name: str, inp: ModuleInput, score: torch.Tensor | None,
                 st: InputStats | None, sparsity: float, use_pbs: bool,
                 fixed_keep: torch.Tensor | None = None, masked_after: bool = False,
                 factor: torch.Tensor | None = None) -> ModuleResult:
    """Mask one module (from ``score``, SparseGPT, or a given ``fixed_keep``) and compute its update
    (``use_pbs``: the compensation of :func:`compensate`, at in-loop prune steps; ``factor`` passed on)."""
    U = inp.U
    rewritten = False
    if fixed_keep is not None:
        keep, weight = fixed_keep, U * fixed_keep
    elif cfg.method == "sparsegpt":
        if st is None:
            raise ConfigError("prune.method=sparsegpt needs full calibration statistics")
        weight, keep = sparsegpt.sparsegpt_prune(U, st.hessian.float(), sparsity,
                                                 pattern=masks.parse_pattern(cfg.pattern),
                                                 blocksize=cfg.sparsegpt_blocksize,
                                                 percdamp=cfg.sparsegpt_percdamp,
                                                 dtype=getattr(torch, cfg.solver_dtype))
        rewritten = True
    else:
        if cfg.saliency == "obs":  # on the module's owner, which holds the full XᵀX (after the EMA of the score)
            if st is None:
                raise ConfigError("prune.saliency=obs needs full calibration statistics")
            factor = scores.obs_column_factor(st.hessian.float(), cfg.sparsegpt_percdamp,
                                              getattr(torch, cfg.solver_dtype))
            score = score * factor.to(score.dtype)[None, :]
        keep = choose_mask(cfg, score, sparsity)
        weight = U * keep
    delta = None
    if use_pbs and st is not None:
        new_weight, delta = compensate(cfg, inp, keep, st, masked_after, factor)
        if new_weight is not None:
            weight, rewritten = new_weight.to(U.dtype), True
    return ModuleResult(keep=keep, weight=weight, delta_B=delta, score=score, rewritten=rewritten)
