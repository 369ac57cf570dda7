"""The stateful pruner: runs prune steps over a model and remembers what it needs between them.

A prune step walks the decoder blocks in order (sequential calibration), scores each block's
linears on their effective (LoRA-merged) weights, chooses masks, optionally computes the Partial
Brain Surgeon update of the adapter, and writes: base weight <- (W + s·B·A) ⊙ mask, B <- ΔB (PBS)
or 0. Between steps it keeps the EMA of the scores and the latest masks. All reads and writes go
through a DistContext, so the same code runs in one process and under ZeRO-3 with many ranks.

The smoothed scores are one number per weight of every module a rank owns: as large as those weights
in float32. They live where ``prune.offload`` says (``none``: beside the weights, e.g. on the GPU;
``cpu``: host memory; ``disk``: files under ``work_dir``), in ``prune.ema_dtype``. With
``prune.hessian_carry`` > 0 the carried ``XᵀX`` of every input group a rank compensates (one [in, in]
float32 matrix per group: q/k/v, o, gate/up, down) waits beside them, in the same kind of store.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PruneConfig
from ..distributed.context import DistContext
from ..errors import ConfigError, XpertError
from ..maths import masks as mask_ops, reconstruct as reconstruct_ops, scores as score_ops
from ..models import lora, structure as st
from ..stats.capture import InputStats
from ..stats.sequential import STAGES, full_forward_stats, sequential_calibration
from ..stats.store import StatsStore
from .maskstore import MaskStore
from .block import ModuleInput, block_scores, prune_module, reconstruct_factor, stats_mode

log = logging.getLogger(__name__)
STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}
EMA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EMA_STORES = {"none": "memory", "cpu": "cpu", "disk": "disk"}


def mask_sha256(keep: torch.Tensor) -> str:
    """Hash of a mask that is independent of memory layout: shape + packed bits."""
    import numpy as np

    bits = np.packbits(keep.detach().cpu().contiguous().numpy().astype(bool).ravel())
    return hashlib.sha256(str(tuple(keep.shape)).encode() + bits.tobytes()).hexdigest()


@dataclass
class StepReport:
    step: int
    final: bool
    target_sparsity: float
    seconds: float
    sparsity: dict[str, float] = field(default_factory=dict)
    mask_sha256: dict[str, str] = field(default_factory=dict)
    moved: dict[str, float] = field(default_factory=dict)  # share of the kept set that changed vs previous step


def warn_few_tokens(stats: dict[str, InputStats]) -> int | None:
    """Warns (and returns the widest input) when a full-XᵀX solve (SparseGPT, OBS reconstruction, full
    PBS) has fewer calibration tokens than a layer has inputs: the damped XᵀX is then rank-deficient and
    the solve amplifies float noise (measured: 2% perplexity between a ZeRO-3 and a single-process run
    of SmolLM2 with 128 tokens for 576 inputs, 0.3% with 1024; tests/train/test_zero3_real.py)."""
    widths = [s.diag.numel() for s in stats.values() if s.mode == "full"]
    tokens = min((s.n for s in stats.values() if s.mode == "full"), default=0)
    if not widths or tokens >= max(widths):
        return None
    log.warning("prune: %d calibration tokens for layers with up to %d inputs: XᵀX is rank-deficient and the "
                "OBS/SparseGPT solve is noise-sensitive; raise data.calib_samples x data.seq_len to >= %d",
                tokens, max(widths), max(widths))
    return max(widths)


class SparsityError(XpertError, RuntimeError):
    """A module's effective weight is not zero off its final mask, or its pruned count is off."""


class Pruner:
    """Holds EMA scores and masks across prune steps of one run (or a single one-shot prune)."""

    def __init__(self, cfg: PruneConfig, ctx: DistContext | None = None, *, batch_size: int = 8,
                 progress: bool = True, work_dir: str | None = None):
        self.cfg = cfg
        self.ctx = ctx or DistContext()
        self.batch_size = batch_size
        self.progress = progress
        kind = EMA_STORES[cfg.offload]
        ema_dir = hessian_dir = None
        if kind == "disk":
            base = cfg.offload_dir or work_dir
            if base is None:
                raise ConfigError("prune.offload=disk needs prune.offload_dir (or a run output directory)")
            ema_dir = f"{base}/ema-rank{self.ctx.rank}"
            hessian_dir = f"{base}/hessian-rank{self.ctx.rank}"
        # scratch between prune steps, not fsynced: a resumed run restores both from its checkpoint (state_dict)
        self.ema = StatsStore(kind, ema_dir, durable=False)  # smoothed scores between prune steps
        self.hessians = StatsStore(kind, hessian_dir, durable=False)  # prune.hessian_carry: carried XᵀX per group
        self.masks = MaskStore()  # latest kept masks, bit-packed on the host
        self.reports: list[StepReport] = []

    def drop_smoothed_scores(self) -> None:
        """Forget the EMA scores and carried XᵀX (after the final prune step they serve nothing), with
        their offload files."""
        for store in (self.ema, self.hessians):
            store.clear()
            if store.directory is not None:
                try:
                    store.directory.rmdir()  # only if empty: never removes anything else
                except OSError:
                    pass

    # ------------------------------------------------------------------ state (checkpointing)
    def state_dict(self) -> dict:
        ema = {k: self.ema.get_tensor(k, "cpu").clone() for k in self.ema.keys()}
        state = {"ema": ema, "masks": dict(self.masks), "n_steps": len(self.reports),
                 "reports": [r.__dict__ for r in self.reports]}
        if len(self.hessians):
            state["hessians"] = {k: self.hessians.get_tensor(k, "cpu").clone() for k in self.hessians.keys()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.ema.clear()
        for k, v in state.get("ema", {}).items():
            self.ema.put_tensor(k, v)
        self.hessians.clear()
        for k, v in state.get("hessians", {}).items():
            self.hessians.put_tensor(k, v)
        self.masks = MaskStore(state.get("masks", {}))
        self.reports = [StepReport(**r) for r in state.get("reports", [])]

    # ------------------------------------------------------------------ one prune step
    def layer_sparsities(self, model: nn.Module, calib_ids: torch.Tensor | None, target: float) -> list[float]:
        """Per-block sparsity: uniform, or OWL's outlier-weighted allocation (mean exactly ``target``)."""
        n_layers = len(st.blocks(model))
        if self.cfg.allocation == "uniform" or target == 0.0:
            return [target] * n_layers
        if calib_ids is None:
            raise ConfigError("prune.allocation=owl needs calibration data")
        all_stats = full_forward_stats(model, calib_ids, mode="diag", batch_size=self.batch_size)
        ratios = []
        for i, block in enumerate(st.blocks(model)):
            with self.ctx.gather(list(block.parameters())):
                lin = st.block_linears(block, self.cfg.modules)
                sc = torch.cat([score_ops.wanda_scores(st.effective_weight(m),
                                                       all_stats[i][st.INPUT_GROUPS[n]].diag).flatten()
                                for n, m in lin.items()])
            ratios.append(mask_ops.owl_outlier_ratio(sc, m=self.cfg.owl_m))
        alloc = mask_ops.owl_sparsities(torch.tensor(ratios, dtype=torch.float64), target, lam=self.cfg.owl_lambda)
        return [float(x) for x in alloc]

    def step(self, model: nn.Module, calib_ids: torch.Tensor | None, sparsity: float, *, final: bool = False,
             fixed_masks: dict[str, torch.Tensor] | None = None, use_pbs: bool | None = None,
             freeze: bool = False) -> StepReport:
        """Prune every block of ``model`` to ``sparsity``; returns what was done.

        ``final``: no EMA smoothing and no compensation (METHOD.md, step 3). ``fixed_masks``: re-apply
        these masks instead of choosing new ones (Wanda-then-LoRA's final merge). ``freeze``: this step
        chooses the final mask (un-smoothed, compensated as configured); afterwards every pruned
        module's LoRA delta trains masked (:meth:`freeze`).
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"sparsity {sparsity} must be in [0, 1)")
        compensates = cfg.pbs != "off" or cfg.reconstruct != "off"
        use_pbs = (compensates and not final) if use_pbs is None else use_pbs
        mode = None if fixed_masks is not None else stats_mode(cfg)
        if use_pbs and mode is None:
            mode = "full" if cfg.pbs in ("full", "shared") or cfg.reconstruct != "off" else "diag"
        if mode is not None and calib_ids is None:
            raise ConfigError(f"prune.method={cfg.method} needs calibration data")
        per_layer = self.layer_sparsities(model, calib_ids, sparsity) if fixed_masks is None else None
        report = StepReport(step=len(self.reports), final=final, target_sparsity=sparsity, seconds=0.0)
        previous = self.masks.copy()

        def on_block(i: int, block: nn.Module, stats: dict[str, InputStats] | None, names=None) -> None:
            if stats is not None:  # block i's owners (group by group when staged): the same at every step
                rotation = i if names is None else len(STAGES) * i + [m for _g, m in STAGES].index(tuple(names))
                stats = self.ctx.reduce_stats(stats, rotation=rotation)
                if i == 0 and mode == "full" and self.ctx.rank == 0:
                    warn_few_tokens(stats)
            s_i = per_layer[i] if per_layer is not None else sparsity
            self.prune_block(model, i, block, stats, s_i, final=final or freeze, use_pbs=use_pbs,
                             fixed_masks=fixed_masks, names=names)

        if mode is None:
            for i, block in enumerate(tqdm(st.blocks(model), desc="prune", disable=not self.progress, leave=False)):
                on_block(i, block, None)
        else:
            n_batches = -(-calib_ids.shape[0] // self.batch_size)
            local = list(self.ctx.shard(n_batches))
            rows = torch.cat([torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, calib_ids.shape[0]))
                              for b in local]) if local else torch.empty(0, dtype=torch.long)
            sequential_calibration(model, calib_ids[rows], on_block, mode=mode, modules=cfg.modules,
                                   dtype=STATS_DTYPES[cfg.stats_dtype], batch_size=self.batch_size,
                                   recompute=self.propagates_pruned(), progress=self.progress,
                                   compute_dtype=None if cfg.calib_dtype == "auto" else getattr(torch, cfg.calib_dtype),
                                   staged=cfg.propagate == "true_sequential",
                                   desc="prune step" if not final else "final prune")
        for name, keep in self.masks.items():
            report.sparsity[name] = mask_ops.sparsity_of(keep)
            report.mask_sha256[name] = mask_sha256(keep)
            if name in previous:
                prev = previous[name]
                report.moved[name] = float((prev & ~keep).sum()) / max(1, int(prev.sum()))
        if freeze:
            self.freeze(model)
        report.seconds = time.perf_counter() - t0
        self.reports.append(report)
        log.info("prune step %d%s: target sparsity %.3f, %d matrices, %.1f s", report.step,
                 " (final)" if final else "", sparsity, len(report.sparsity), report.seconds)
        return report

    def propagates_pruned(self) -> bool:
        """Whether this step's next-block calibration inputs are the pruned block's outputs
        (``prune.propagate``; ``pruned_first``: only while no mask exists yet, a resumed run included)."""
        p = self.cfg.propagate
        return p in ("pruned", "true_sequential") or (p == "pruned_first" and not len(self.masks))

    # ------------------------------------------------------------------ the final mask
    def pruned_modules(self, model: nn.Module):
        """(full name, module) of every pruned module that has a mask."""
        for i, block in enumerate(st.blocks(model)):
            for n, m in st.block_linears(block, self.cfg.modules).items():
                name = f"model.layers.{i}.{'self_attn' if n in st.ATTN else 'mlp'}.{n}"
                if name in self.masks:
                    yield name, m

    def freeze(self, model: nn.Module) -> int:
        """The masks are final: every pruned module's LoRA delta trains masked from now on. Where the base
        weight's support is exactly the mask (:func:`lora.support_is_mask`: what a prune step writes on a
        float base) the mask is read from the weight and nothing is stored beside the module; returns the
        number of modules that keep a bit-packed mask buffer instead."""
        stored = masked = 0
        grad_dtype = None if self.cfg.masked_grad_dtype == "auto" else getattr(torch, self.cfg.masked_grad_dtype)
        for name, m in self.pruned_modules(model):
            if st.lora_parts(m) is None:
                continue
            keep = self.masks[name]
            with self.ctx.gather([st.base_linear(m).weight]):
                implicit = lora.support_is_mask(m, keep)
            lora.mask_delta(m, keep, implicit=implicit, grad_dtype=grad_dtype,
                            straight_through=self.cfg.masked_grad == "straight_through")
            stored += not implicit
            masked += 1
        log.info("masked adapter: %d modules read the mask from their base weight, %d keep a bit-packed mask",
                 masked - stored, stored)
        return stored

    def verify(self, model: nn.Module, sparsity: float) -> StepReport:
        """The step after training when the mask was final before: no new mask, no merge; checks that
        every pruned module's effective weight ``W + s·(BA)⊙M`` is exactly zero off its mask and that
        the mask prunes exactly ``round(sparsity·numel)`` entries (uniform unstructured)."""
        t0 = time.perf_counter()
        report = StepReport(step=len(self.reports), final=True, target_sparsity=sparsity, seconds=0.0)
        exact = self.cfg.pattern == "unstructured" and self.cfg.allocation == "uniform"
        for name, m in self.pruned_modules(model):
            keep = self.masks[name]
            with self.ctx.gather(list(m.parameters())):
                U = st.effective_weight(m)
            leaked = int((U[~keep.to(U.device)] != 0).sum())
            if leaked:
                raise SparsityError(f"{name}: {leaked} pruned entries are non-zero in the trained model")
            if exact and int((~keep).sum()) != mask_ops.prune_count(sparsity, keep.numel()):
                raise SparsityError(f"{name}: {int((~keep).sum())} pruned entries, expected "
                                    f"{mask_ops.prune_count(sparsity, keep.numel())}")
            report.sparsity[name] = mask_ops.sparsity_of(keep)
            report.mask_sha256[name] = mask_sha256(keep)
            report.moved[name] = 0.0
        report.seconds = time.perf_counter() - t0
        self.reports.append(report)
        log.info("final step %d: masks verified (no re-prune), %d matrices, %.1f s", report.step,
                 len(report.sparsity), report.seconds)
        return report

    # ------------------------------------------------------------------ one block
    def prune_block(self, model, i: int, block: nn.Module, stats: dict[str, InputStats] | None, sparsity: float, *,
                    final: bool = False, use_pbs: bool = True, fixed_masks: dict | None = None,
                    names=None) -> None:
        """Score, mask, (PBS) and write block ``i`` from its reduced input statistics: the body of a prune
        step, public so that a benchmark can time one block alone. ``names``: only these linears (one input
        group of a staged calibration); ForeSight still reads every consumer's current weight."""
        cfg, ctx = self.cfg, self.ctx
        geo = st.geometry(model)
        layers = st.blocks(model)
        linears = st.block_linears(block, [n for n in cfg.modules if names is None or n in names])
        prefix = f"model.layers.{i}"
        full_name = {n: f"{prefix}.{'self_attn' if n in st.ATTN else 'mlp'}.{n}" for n in linears}
        with ctx.gather(list(block.parameters()), modify=True):
            inputs = {}
            for n, m in linears.items():
                parts = st.lora_parts(m)
                inputs[n] = ModuleInput(st.effective_weight(m), parts[0].detach().float() if parts else None,
                                        parts[2] if parts else 0.0)
            scores = None
            if fixed_masks is None and cfg.method != "sparsegpt":
                scores = self._block_scores(inputs, stats, geo, block, layers, i)

            factors: dict[str, torch.Tensor | None] = {}  # prune.reconstruct=obs: one factor per input group
            carried: dict[str, InputStats] = {}  # prune.hessian_carry: one carried XᵀX per input group

            def compute(name: str) -> dict[str, torch.Tensor]:
                fname = full_name[name]
                score = None
                if scores is not None:
                    score = scores[name]
                    if not final and cfg.ema_eta < 1.0:
                        prev = self.ema.get_tensor(fname, score.device) if fname in self.ema else None
                        score = score_ops.ema_scores(score, prev, cfg.ema_eta)
                        self.ema.put_tensor(fname, score.to(EMA_DTYPES[cfg.ema_dtype]))
                fixed = fixed_masks[fname] if fixed_masks is not None else None
                group = st.INPUT_GROUPS[name]
                gstats = stats.get(group) if stats else None
                solves = use_pbs or cfg.method == "sparsegpt" or cfg.saliency == "obs"  # reads the full XᵀX
                if cfg.hessian_carry > 0 and solves and fixed is None and gstats is not None and gstats.mode == "full":
                    if group not in carried:  # on this module's owner, which holds the full XᵀX
                        carried[group] = self._carry(f"{prefix}.{group}", gstats)
                    gstats = carried[group]
                if cfg.reconstruct == "obs" and use_pbs and gstats is not None and group not in factors:
                    factors[group] = reconstruct_factor(cfg, gstats)
                res = prune_module(cfg, name, inputs[name], score, gstats, sparsity, use_pbs, fixed_keep=fixed,
                                   masked_after=final and use_pbs, factor=factors.get(group))
                out = {"keep": res.keep}
                if res.rewritten:
                    out["weight"] = res.weight
                if res.delta_B is not None:
                    out["delta_B"] = res.delta_B
                return out

            sizes = {n: inputs[n].U.numel() for n in linears}
            results = ctx.compute_owned(sorted(linears), sizes, compute)
            trainable_writes = []
            for n, m in linears.items():
                r = results[n]
                keep = r["keep"].bool()
                weight = r.get("weight", inputs[n].U * keep)
                st.set_base_weight(m, weight, ctx.write_frozen)
                parts = st.lora_parts(m)
                if parts is not None:
                    B = parts[1]
                    new_B = r.get("delta_B", torch.zeros(B.shape if B.numel() else B.ds_shape))
                    ctx.write_frozen(B, new_B)  # so forwards inside this gather see it
                    trainable_writes.append((B, new_B))
                self.masks[full_name[n]] = keep.cpu()
        for B, value in trainable_writes:
            ctx.write_trainable(B, value)

    def _carry(self, key: str, stats: InputStats) -> InputStats:
        """This step's XᵀX of one input group plus the carried sum of the earlier steps' (stored for the next)."""
        H = stats.hessian.float()
        prev = self.hessians.get_tensor(key, H.device) if key in self.hessians else None
        H = reconstruct_ops.carry_hessian(H, prev, self.cfg.hessian_carry)
        self.hessians.put_tensor(key, H)
        return InputStats(H, stats.n, "full")

    def _block_scores(self, inputs, stats, geo, block, layers, i) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        targets = list(inputs)  # the modules this call prunes; the ones added below are read as consumers
        next_U, norms = None, {}
        if cfg.method == "foresight" and cfg.variant == "exact":
            attn_norm, mlp_norm = st.norm_weights(block)
            norms["mlp"] = mlp_norm
            if i + 1 < len(layers):
                nxt = layers[i + 1]
                with self.ctx.gather(list(nxt.parameters())):
                    lin = st.block_linears(nxt, ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
                    next_U = {n: st.effective_weight(m) for n, m in lin.items()}
                    norms["next_attn"], norms["next_mlp"] = st.norm_weights(nxt)
            missing = [n for n in st.LLAMA_LINEARS if n not in inputs]
            if missing:  # consumers of pruned modules may be modules that are not pruned
                lin = st.block_linears(block, missing)
                inputs = {**inputs, **{n: ModuleInput(st.effective_weight(m)) for n, m in lin.items()}}
        targets = [n for n in cfg.modules if n in targets]
        return block_scores(cfg, inputs, stats, geo.n_heads, geo.n_kv_heads, next_U=next_U, norms=norms,
                            targets=targets)
