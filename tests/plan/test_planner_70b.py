"""Planner terms corrected by the 70B rehearsal (bench/rehearsal_70b/), hand-computed.

* the last block has no next block: ForeSight gathers none for a one-block model (the code's
  ``if i + 1 < len(layers)``; checked here against the real Pruner with a recording context);
* ZeRO-3 cannot hold more gathered parameters than the whole model;
* SparseGPT's workspace is two ``in × in`` matrices of the widest-input module in the solver dtype
  plus a working copy of W and two masks, and its reconstructed weights are broadcast with the masks.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from xpert_dist.plan.memory import PlanSpec, estimate
from xpert_dist.plan.shapes import ModelShape

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=112, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=1, tie_word_embeddings=False)


def _terms(**kw):
    layers = kw.pop("layers", 1)
    shape = ModelShape.from_config(dict(TINY, num_hidden_layers=layers))
    spec = PlanSpec(model=shape, nodes=1, gpus_per_node=2, zero_stage=3, dtype="float32", accelerator="cpu",
                    seq_len=8, micro_batch=1, calib_samples=4, **kw)
    return shape, {(t.step, t.name): t.bytes for t in estimate(spec).terms}


def test_no_next_block_gather_for_the_last_block():
    _, one = _terms(layers=1, method="foresight", pbs="full")
    shape2, two = _terms(layers=2, method="foresight", pbs="full")
    assert not any("next block" in name for _, name in one)
    blk = shape2.block_params()
    assert two[("prune", "gathered next block (ForeSight consumers)")] == blk * 4 * 2  # x2: gloo staging
    n_lin = shape2.block_linear_params()
    nxt = shape2.block_linear_params(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    assert one[("prune", "effective weights U (fp32)")] == n_lin * 4
    assert two[("prune", "effective weights U (fp32)")] == (n_lin + nxt) * 4


def test_real_pruner_gathers_the_next_block_only_when_there_is_one():
    """The oracle for the term above: count which blocks a real ForeSight prune step gathers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from xpert_dist.config import PruneConfig
    from xpert_dist.distributed.context import DistContext
    from xpert_dist.models import structure as st
    from xpert_dist.prune.pruner import Pruner

    class Recording(DistContext):
        def __init__(self, blocks):
            super().__init__()
            self.ids = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
            self.seen = []

        def gather(self, params, modify=False):
            params = list(params)
            hit = sorted({self.ids[id(p)] for p in params if id(p) in self.ids})
            if hit:
                self.seen.append(tuple(hit))
            return contextlib.nullcontext()

    for layers in (1, 2):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**dict(TINY, num_hidden_layers=layers)))
        ctx = Recording(st.blocks(model))
        Pruner(PruneConfig(method="foresight", pbs="full", sparsity=0.5), ctx, batch_size=2,
               progress=False).step(model, torch.randint(0, 64, (4, 8)), 0.5)
        # block i is gathered for its own prune; the next one is gathered as ForeSight's consumer
        nexts = [s for s in ctx.seen if s != (0,) and s[0] > 0]
        if layers == 1:
            assert set(ctx.seen) == {(0,)}
        else:
            assert (1,) in nexts and ctx.seen.count((1,)) >= 2  # as consumer of block 0, then its own prune


def test_gathered_parameters_capped_at_the_model():
    shape, t = _terms(layers=1, method="wanda", pbs="off")
    P = shape.total_params()
    assert P < max(shape.embed_params(), shape.block_params()) + shape.block_params()
    assert t[("train", "ZeRO-3 gathered parameters")] == P * 4


def test_sparsegpt_workspace_in_the_solver_dtype():
    shape, t32 = _terms(method="sparsegpt", pbs="off", solver_dtype="float32")
    _, t64 = _terms(method="sparsegpt", pbs="off", solver_dtype="float64")
    o, i = 32, 112  # down_proj: the widest input
    assert t32[("prune", "SparseGPT workspace (largest-input module, float32)")] == 2 * i * i * 4 + o * i * (4 + 2)
    assert t64[("prune", "SparseGPT workspace (largest-input module, float64)")] == 2 * i * i * 8 + o * i * (8 + 2)
    n_lin = shape.block_linear_params()
    assert t32[("prune", "masks + reconstructed weights of the block (broadcast)")] == n_lin * 5


def test_obs_reconstruction_needs_the_full_hessian_and_the_solver_workspace():
    """prune.reconstruct=obs (the domain configs' default) accumulates the full XᵀX per input group like
    SparseGPT, runs SparseGPT's solver on the chosen mask, and broadcasts the rewritten weights."""
    shape, off = _terms(method="foresight", pbs="off")
    _, obs = _terms(method="foresight", pbs="off", reconstruct="obs")
    dims = shape.group_dims()
    # one calibration batch (the leaf) holds every group's statistic: d per group (diagonal), d² (full)
    leaf_off = [v for (s, n), v in off.items() if s == "prune" and n.startswith("statistics tree partials")]
    leaf_obs = [v for (s, n), v in obs.items() if s == "prune" and n.startswith("statistics tree partials")]
    assert leaf_off and leaf_obs
    assert leaf_off[0] % sum(dims.values()) == 0 and leaf_obs[0] % sum(d * d for d in dims.values()) == 0
    assert leaf_obs[0] // sum(d * d for d in dims.values()) == leaf_off[0] // sum(dims.values())
    o, i = 32, 112  # down_proj: the widest input
    assert obs[("prune", "OBS reconstruction workspace (largest-input module, float32)")] == 2 * i * i * 4 + o * i * 6
    assert ("prune", "scores (fp32, all modules of the block)") in obs  # the mask is still ForeSight's
    n_lin = shape.block_linear_params()
    assert obs[("prune", "masks + reconstructed weights of the block (broadcast)")] == n_lin * 5
    assert off[("prune", "masks + results of the block (bool, broadcast)")] == n_lin
    assert not any("workspace" in n and "OBS" in n for _, n in off)


def test_obs_reconstruction_refuses_a_second_compensation():
    import pytest

    from xpert_dist.errors import ConfigError

    for kw in (dict(method="sparsegpt", pbs="off"), dict(method="foresight", pbs="diagonal")):
        with pytest.raises(ConfigError, match="compensates a second time"):
            _terms(reconstruct="obs", **kw)


def test_obs_saliency_alone_needs_the_full_hessian():
    shape, diag = _terms(method="foresight", pbs="off")
    _, obs = _terms(method="foresight", pbs="off", saliency="obs")
    dims = shape.group_dims()
    leaf = {k: [v for (s, n), v in t.items() if n.startswith("statistics tree partials")][0]
            for k, t in (("diag", diag), ("obs", obs))}
    assert leaf["obs"] * sum(dims.values()) == leaf["diag"] * sum(d * d for d in dims.values())
    i = 112  # down_proj: the widest input
    assert obs[("prune", "OBS saliency workspace (largest-input module, float32)")] == 2 * i * i * 4
    # the mask is ForeSight's on the unchanged weights: only masks are broadcast
    assert obs[("prune", "masks + results of the block (bool, broadcast)")] == shape.block_linear_params()


def _sbatch(script, key: str) -> str:
    import re

    return re.search(rf"^#SBATCH --{key}=(\S+)", script.read_text(), re.M).group(1)


@pytest.mark.parametrize("config, script, shape, gpu_gb, host_gb", [
    # slurm/prune_70b.sh asks for 80 GB GPUs and all of a node's memory (--mem=0): 512 GiB assumed
    ("llama70b_health", "prune_70b", "llama2_70b", 80, 512),
    # slurm/prune_7b.sh: "40-80 GB GPUs", --mem=256G; planned on the smaller GPU
    ("llama7b_health", "prune_7b", "llama2_7b", 40, 256),
])
def test_shipped_cluster_configs_fit_their_sbatch_allocation(config, script, shape, gpu_gb, host_gb):
    """The cluster configs ship the domain configs' recipe (OBS reconstruction from the full XᵀX, the ramp, the
    carried XᵀX over per-step calibration windows):
    planned with their own settings, the DeepSpeed config their sbatch script names and that script's nodes and
    GPUs, both the training step and the prune step fit on the GPUs and in host memory."""
    import json
    import re
    from pathlib import Path

    from xpert_dist.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / f"{config}.yaml")
    sh = root / "slurm" / f"{script}.sh"
    ds_path = re.search(r"^DS_CONFIG=(\S+)", sh.read_text(), re.M).group(1)
    zero = json.loads((root / ds_path).read_text())["zero_optimization"]
    p = cfg.prune
    spec = PlanSpec(model=ModelShape.load(shape), nodes=int(_sbatch(sh, "nodes")),
                    gpus_per_node=int(_sbatch(sh, "gpus-per-node")), gpu_mem_gb=gpu_gb, host_mem_gb=host_gb,
                    zero_stage=zero["stage"],
                    offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none"),
                    offload_params=zero.get("offload_param", {}).get("device", "none"),
                    method=p.method, pbs=p.pbs, pbs_support=p.pbs_support, reconstruct=p.reconstruct,
                    saliency=p.saliency, propagate=p.propagate, lora_r=cfg.lora.r, lora_dropout=cfg.lora.dropout,
                    seq_len=cfg.data.seq_len,
                    micro_batch=cfg.train.micro_batch_size, calib_samples=cfg.data.calib_samples,
                    stats_offload=p.offload, stats_dtype=p.stats_dtype, solver_dtype=p.solver_dtype,
                    dtype=cfg.model.dtype, grad_checkpointing=cfg.train.gradient_checkpointing,
                    hessian_carry=p.hessian_carry > 0)
    plan = estimate(spec)
    # what the domain configs ship: OBS from the full XᵀX, the ramp, each step's own windows and the carried XᵀX
    assert p.reconstruct == "obs" and p.ramp == "cubic" and p.hessian_carry == 1.0 and cfg.data.calib_sets == 4
    assert any(t.name.startswith("carried XᵀX") for t in plan.terms)
    for step in ("train", "prune"):
        assert plan.fits[step]["accel"] and plan.fits[step]["host"], (step, plan.peaks[step], plan.suggestions)
    # the OBS solve of down_proj (the widest input) is planned: two I x I fp32 matrices on the accelerator
    obs = [t for t in plan.terms if t.name.startswith("OBS reconstruction workspace")]
    assert obs and obs[0].bytes >= 2 * ModelShape.load(shape).intermediate ** 2 * 4
