"""ZeRO-3 with models loaded the way every real checkpoint is: through ``HfDeepSpeedConfig``
(partitioned loading), which the tiny random models (``model.tiny``) skip.

* loading: the weights gathered from the ZeRO-3 partitions equal a single-process load, and
  zero.Init is off again after the load (a plain model can then be built on one rank alone);
* a random Llama with SmolLM2's vocabulary (49,152 x 64 embedding, tied and untied), saved as a
  plain folder, trains, prunes in the loop and exports on 2 ranks, also when one rank holds no
  calibration batch (the embedding gather must still be joined by every rank);
* gradual pruning with OWL's layer sparsities on 2 ranks: each step's per-matrix sparsities and the
  exported masks are the single process's;
* the packaged SmolLM2 (GGUF) end to end through the real entry point, with the deepspeed launcher
  on 1 process and torchrun on 2: the export reloads with plain transformers, its sparsity is
  exact, and masks and perplexity match a single-process run with the same global batch
  (float noise as launchers/repro.py defines it; perplexity within 1%).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import REPO, free_port
from xpert_dist.launch.export_diff import (base_linears, launcher_command, mask_disagreement, pruned_linears,
                                          update_difference)
from xpert_dist.launch.repro import MASK_FRACTION_NOISE, PRE_PRUNE_LOSS_REL_NOISE

pytestmark = pytest.mark.slow

ZERO3 = REPO / "ds_configs" / "zero3.json"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=["tied", "untied"])
def random_llama(request, tmp_path_factory) -> Path:
    """A random Llama saved as a plain HF folder: 2 blocks, hidden 64, SmolLM2's tokenizer and vocab."""
    from transformers import LlamaForCausalLM

    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import load_tokenizer, tiny_llama_config

    folder = tmp_path_factory.mktemp(f"random_llama_{request.param}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=49152, tie_word_embeddings=request.param == "tied"))
    model.save_pretrained(folder)
    load_tokenizer(ModelConfig(name_or_path="smollm2")).save_pretrained(folder)
    return folder


def _single_process_digests(model_cfg: dict) -> dict[str, str]:
    import contextlib

    from tests.distributed.zero3_load_workers import param_digests
    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import load_model

    model = load_model(ModelConfig(**model_cfg))
    return param_digests(model, lambda _ps: contextlib.nullcontext())


def _check_partitioned_load(model_cfg: dict, timeout: float, partitioned: bool, want: dict | None = None):
    from tests.distributed.harness import ok, run_ranks
    from tests.distributed.zero3_load_workers import load_partitioned

    res = ok(run_ranks(load_partitioned, 2, model_cfg, str(ZERO3), timeout=timeout))
    want = want or _single_process_digests(model_cfg)
    for rank, r in res.items():
        assert r["inside"] is True and r["after"] is False, (rank, r["inside"], r["after"])
        assert r["partitioned"] is partitioned, f"rank {rank}: partitioned at load: {r['partitioned']}"
        assert r["digests"] == want, f"rank {rank}: gathered weights differ from the single-process load"
    assert res[0]["built_alone"] is True


def test_partitioned_load_equals_single_process(random_llama):
    _check_partitioned_load({"name_or_path": str(random_llama)}, timeout=180, partitioned=True)


def test_partitioned_load_smollm2_gguf():
    """Read from the GGUF file (model.gguf_cache=false), transformers dequantises it into a plain model:
    zero.Init does not apply to it (each rank holds the full model until deepspeed.initialize partitions it).
    Read through its dequantised copy (the default; the pipeline makes the copy before zero.Init), the load is
    partitioned like any plain folder's. Both give the single-process load's weights exactly (one single-process
    load, through the copy: that it is the GGUF file's dequantisation bit for bit is
    tests/train/test_smollm2_real.py::test_packaged_smollm2_loads_and_predicts_english)."""
    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import gguf_plain_copy

    assert gguf_plain_copy(ModelConfig(name_or_path="smollm2")) is not None
    want = _single_process_digests({"name_or_path": "smollm2"})
    _check_partitioned_load({"name_or_path": "smollm2", "gguf_cache": False}, timeout=300, partitioned=False, want=want)
    _check_partitioned_load({"name_or_path": "smollm2"}, timeout=300, partitioned=True, want=want)


def _env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
            "XPERT_DIST_TIMEOUT_S": "120"}


def _run(launcher: str, world: int, out: Path, overrides: list[str], timeout: float = 600):
    args = ["--no-progress", "--config", "configs/default_health.yaml", f"output_dir={out}", *overrides]
    cmd = launcher_command(launcher, world, args, ZERO3, free_port())
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{launcher} x{world} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / "results.json").read_text())


def _exported_masks(out: Path, sparsity: float) -> dict[str, torch.Tensor]:
    """Reload the export with plain transformers; check every pruned matrix has exactly
    round(sparsity * numel) zeros; return the kept sets (weight != 0)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    kept = {}
    for name, p in model.named_parameters():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            zeros = int((p == 0).sum())
            assert zeros == round(sparsity * p.numel()), f"{name}: {zeros} zeros, want {round(sparsity * p.numel())}"
            kept[name] = p != 0
    assert len(kept) == 7 * model.config.num_hidden_layers
    return kept


def test_zero3_random_llama_plain_folder(random_llama, tmp_path):
    """The issue's second failure: one calibration batch (rank 1 holds none), in-loop prune, export."""
    common = [f"model.name_or_path={random_llama}", "train.max_steps=2", "prune.prune_every=1", "prune.prune_steps=0",
              "train.batch_size=2",
              "data.calib_samples=1", "data.seq_len=64", "lora.dropout=0", "eval.tasks=[]",
              "eval.perplexity_windows=2", "eval.perplexity_seq_len=64", "prune.offload=none"]
    res = _run("torchrun", 2, tmp_path / "zero3", common, timeout=300)
    assert res["world_size"] == 2 and len(res["prune_reports"]) == 2
    _exported_masks(tmp_path / "zero3", 0.4)


@pytest.mark.parametrize("random_llama", ["untied"], indirect=True)  # tying is covered above; one run pair is enough
def test_zero3_gradual_owl_matches_single_process(random_llama, tmp_path):
    """Gradual pruning (prune.ramp=cubic) with OWL's layer sparsities (prune.allocation=owl) on 2 ZeRO-3 ranks:
    the allocation is computed from full-model forwards of the partitioned model, so each prune step's
    per-matrix sparsities and the exported masks must be the single process's (same global batch), and the
    export must hold exactly the sparsity the last step reported for each matrix (a mean of 40%)."""
    common = [f"model.name_or_path={random_llama}", "train.max_steps=4", "prune.prune_every=1", "prune.prune_steps=0",
              "train.batch_size=2",
              "data.calib_samples=16", "data.seq_len=64", "lora.dropout=0", "eval.tasks=[]",
              "eval.perplexity_windows=2", "eval.perplexity_seq_len=64", "prune.offload=none",
              "eval.base_reference=false", "prune.ramp=cubic", "prune.allocation=owl", "prune.owl_lambda=0.1",
              "prune.mask_final=last_inloop"]
    ref = _run("python", 1, tmp_path / "single", common, timeout=300)
    got = _run("torchrun", 2, tmp_path / "zero3", common, timeout=300)
    assert got["world_size"] == 2
    in_loop = [r for r in ref["prune_reports"] if not r["final"]]
    targets = [r["target_sparsity"] for r in in_loop]
    # three in-loop steps (before optimizer steps 1, 2, 3) ramping 0.4 * (1 - (1 - k/3)^3); the last reaches 0.4
    assert targets == pytest.approx([0.4 * (1 - (1 - k / 3) ** 3) for k in (1, 2, 3)], abs=1e-9), targets
    for r, g in zip(ref["prune_reports"], got["prune_reports"], strict=True):
        assert r["target_sparsity"] == g["target_sparsity"]
        assert r["sparsity"].keys() == g["sparsity"].keys()
        for name, s in r["sparsity"].items():
            assert g["sparsity"][name] == pytest.approx(s, abs=2e-3), (r["step"], name, s, g["sparsity"][name])
    last = in_loop[-1]["sparsity"]
    # OWL spreads the 40%: the two blocks get different sparsities, whose mean is the target
    per_block = {n.split(".layers.")[1].split(".")[0]: s for n, s in last.items() if ".layers." in n}
    assert len(set(round(v, 3) for v in per_block.values())) > 1, last
    assert sum(per_block.values()) / len(per_block) == pytest.approx(0.4, abs=0.01), per_block

    from transformers import AutoModelForCausalLM

    masks = {}
    for run in ("single", "zero3"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / run / "model", dtype=torch.float32)
        masks[run] = {n: p != 0 for n, p in model.named_parameters()
                      if n.endswith(".weight") and n.split(".")[-2] in LINEARS}
    for name, m in masks["single"].items():
        want = last[name.removesuffix(".weight")]
        assert 1 - m.float().mean().item() == pytest.approx(want, abs=1e-3), (name, want)
    frac = mask_disagreement(masks["single"], masks["zero3"])
    assert frac <= MASK_FRACTION_NOISE, f"{frac:.2e} of mask entries differ from the single process"


@pytest.mark.e2e
def test_zero3_smollm2_end_to_end(tmp_path):
    """SmolLM2 (GGUF) through launchers/run.py with the shipped pruning, ramp included: single process (reference),
    deepspeed launcher on one process with ZeRO-3, torchrun on two; all export, reload and agree, and the
    OBS update of the kept weights under ZeRO-3 is the single process's.

    16 calibration windows of 64 tokens: with 2 (128 tokens for 576 inputs) the damped XᵀX is so
    ill-conditioned that float noise between the runs moved perplexity by 2% (measured, 34.66 against
    33.97); with 16 the OBS solution is well posed (0.3%).

    32 perplexity windows of 64 tokens: with the ramp (two prune steps) the exports differ by float noise in
    0.2% of mask entries, and 2 windows (128 tokens) resolve that as a 1.2% perplexity gap on 2 ranks (8 windows:
    1.5%, 16: 0.8%, 32: 0.07%; measured on the same three exports), the single window subset deciding."""
    common = ["train.max_steps=3",
              "train.batch_size=2", "train.warmup_steps=1",
              "data.calib_samples=16", "data.seq_len=64", "lora.dropout=0", "eval.tasks=[]",
              "eval.perplexity_windows=32", "eval.perplexity_seq_len=64", "prune.offload=none",
              # the shipped default's pruning (configs/default_health.yaml: ForeSight, OBS reconstruction of the
              # kept base weights from the rank-summed full XᵀX, LR rewinding, prune_steps=4 on the cubic ramp with
              # the mask final at 2/3 of training, the last step training the adapter masked with straight-through
              # gradients, prune.masked_grad); no base-model evaluation
              "eval.base_reference=false"]
    ref = _run("python", 1, tmp_path / "single", common)
    # at 3 optimizer steps the shipped ramp is two prune steps (before steps 1 and 2; the mask final at
    # round(0.667 * 3) = 2) to 0.4 * (1 - (1 - k/2)^3): 7/8 of the target, then all of it, the mask moving
    # between them
    in_loop = [r for r in ref["prune_reports"] if not r["final"]]
    assert [r["target_sparsity"] for r in in_loop] == pytest.approx([0.4 * 7 / 8, 0.4], abs=1e-9)
    ref_masks = _exported_masks(tmp_path / "single", 0.4)
    base = base_linears()
    ref_weights = pruned_linears(tmp_path / "single")
    for launcher, world in (("deepspeed", 1), ("torchrun", 2)):
        out = tmp_path / f"{launcher}{world}"
        res = _run(launcher, world, out, common)
        assert res["world_size"] == world
        assert [r["target_sparsity"] for r in res["prune_reports"]] == \
            [r["target_sparsity"] for r in ref["prune_reports"]], launcher
        masks = _exported_masks(out, 0.4)
        # "match" as launchers/repro.py defines float noise across world sizes: the first step's loss
        # (before any prune step) agrees to 1e-5 relative, masks differ in at most 1% of entries
        first, ref_first = res["loss_history"][0][1], ref["loss_history"][0][1]
        assert abs(first / ref_first - 1) <= PRE_PRUNE_LOSS_REL_NOISE, (launcher, world, first, ref_first)
        frac = mask_disagreement(ref_masks, masks)
        assert frac <= MASK_FRACTION_NOISE, f"{launcher} x{world}: {frac:.2e} of mask entries differ from the single process"
        ppl, ref_ppl = res["metrics"]["perplexity"], ref["metrics"]["perplexity"]
        assert abs(ppl / ref_ppl - 1) <= 0.01, f"{launcher} x{world}: perplexity {ppl} vs {ref_ppl}"
        # OBS moved the kept weights (norm ~260 over the model); on rows whose masks agree, the ZeRO-3
        # export is the single process's up to float noise that the OBS solve amplifies (measured ~3%). A
        # skipped reconstruction, or statistics of one rank's share only, give a difference of order 1.
        rel = update_difference(base, ref_weights, pruned_linears(out))
        assert rel <= 0.1, f"{launcher} x{world}: OBS update differs from the single process's by {rel:.3f}"
