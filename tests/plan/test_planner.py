"""Memory planner: hand-checked parameter bytes, measured activation formula, CLI."""
import json
import subprocess
import sys

import pytest
import torch

from xpert_dist.errors import ConfigError
from xpert_dist.plan.__main__ import main
from xpert_dist.plan.memory import GiB, PlanSpec, estimate, layer_activation_bytes, tree_peak_partials
from xpert_dist.plan.shapes import ModelShape
from xpert_dist.stats.tree import TreeSum

TINY = dict(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, tie_word_embeddings=False)


@pytest.mark.parametrize("name, count", [("llama2_7b", 6_738_415_616), ("llama2_70b", 68_976_648_192),
                                         ("llama31_70b", 70_553_706_496)])
def test_shipped_configs_match_public_parameter_counts(name, count):
    assert ModelShape.load(name).total_params() == count


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_and_lora_counts_equal_the_real_model(tied):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(TINY, tie_word_embeddings=tied)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    shape = ModelShape.from_config(cfg)
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=list(shape.linear_shapes())))
    assert shape.lora_params(8) == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


def test_hand_computed_small_case():
    shape = ModelShape.from_config(TINY)
    P = 300 * 96 * 2 + 96 + 3 * (96 * 96 * 2 + 32 * 96 * 2 + 3 * 96 * 200 + 2 * 96)  # embed+head, norm, blocks
    assert shape.total_params() == P
    plan = estimate(PlanSpec(model=shape, nodes=1, gpus_per_node=2, zero_stage=3, dtype="float32",
                             accelerator="cpu", seq_len=16, micro_batch=2, calib_samples=8, method="wanda",
                             pbs="off"))
    terms = {(t.step, t.name): t.bytes for t in plan.terms}
    assert terms[("train", "base weights (ZeRO-3 shard)")] == P * 4 / 2
    L_r = 3 * 8 * ((96 + 96) * 2 + (32 + 96) * 2 + (200 + 96) * 3)
    assert shape.lora_params(8) == L_r
    assert terms[("train", "optimizer (fp32 master + AdamW m, v)")] == L_r * 12 / 2
    # 8 samples / batch 2 = 4 batches over 2 ranks: 2 each -> 4 rows in + out
    assert terms[("prune", "calibration hidden states (block in + out)")] == 2 * 4 * 16 * 96 * 4
    assert all(t.where == "host" for t in plan.terms)  # the CPU case: everything in host memory


def _measured_layer_bytes(cfg_kw, dropout, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for L in (1, 2):
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(**dict(cfg_kw, num_hidden_layers=L))).to(dtype)
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]))
        m.train()
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        ids = torch.randint(0, cfg_kw["vocab_size"], (2, 24))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids, labels=ids)
        out[L] = sum(seen.values())
    return (out[2] - out[1]) / 48


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_activation_formula_matches_saved_tensors(dropout):
    cfg = dict(vocab_size=128, hidden_size=160, intermediate_size=432, num_attention_heads=5,
               num_key_value_heads=1, tie_word_embeddings=True)
    measured = _measured_layer_bytes(cfg, dropout, torch.float32)
    predicted = layer_activation_bytes(ModelShape.from_config(dict(cfg, num_hidden_layers=1)), 8, dropout, 4)
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)


def test_tree_peak_partials_matches_treesum():
    for a in range(0, 20):
        for n in range(1, 40):
            t = TreeSum()
            for g in range(a, a + n):
                t.push(g, torch.zeros(1))
            assert tree_peak_partials(a, a + n) == t.max_live + 1


def test_70b_verdicts_and_suggestions():
    shape = ModelShape.load("llama31_70b")
    bad = estimate(PlanSpec(model=shape, nodes=1, gpus_per_node=8, gpu_mem_gb=80, pbs="full"))
    assert not bad.fits["train"]["accel"]
    assert any("gradient checkpointing" in s for s in bad.suggestions)
    good = estimate(PlanSpec(model=shape, nodes=2, gpus_per_node=8, gpu_mem_gb=80, pbs="full",
                             grad_checkpointing=True, stats_offload="cpu"))
    assert good.fits["train"]["accel"] and good.fits["prune"]["accel"], good.suggestions
    assert good.peaks["train"]["accel"] < 80 * GiB
    # the prune step's largest statistic is the down_proj Hessian: I² fp32 = 3 GiB on its owner
    held = [t for t in good.terms if t.name.startswith("reduced statistics held")][0]
    assert held.bytes == 28672 ** 2 * 4 + (3 * 8192 + 28672) * 4  # down_in alone + every diagonal


def test_cli_table_json_and_errors(capsys):
    rc = main(["--model-config", "llama2_7b", "--nodes", "1", "--gpus-per-node", "8", "--zero-stage", "3",
               "--grad-checkpointing", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["params"] == 6_738_415_616 and out["fits"]["train"]["accel"]
    rc = main(["--model-config", "llama31_70b", "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gb", "80"])
    text = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in text and "TRAINING STEP" in text and "PRUNE STEP" in text
    assert main(["--model-config", "no_such_model"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="offload-params"):
        estimate(PlanSpec(model=ModelShape.load("llama2_7b"), zero_stage=2, offload_params="cpu"))


def test_cli_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "xpert_dist.plan", "--model-config", "llama2_70b", "--nodes", "4",
                        "--gpus-per-node", "8", "--grad-checkpointing", "--stats-offload", "cpu", "--pbs", "full"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 1) and "PRUNE STEP" in r.stdout, r.stderr


WIDE = dict(vocab_size=300, hidden_size=2048, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=4, tie_word_embeddings=False)


@pytest.mark.parametrize("gpus, stats_offload", [(4, "none"), (4, "cpu"), (2, "none")])
def test_reduce_scatter_buffers_hand_computed(gpus, stats_offload):
    """Full statistics (SparseGPT): down_proj's XᵀX is 4096²·4 B = 64 MiB, above the 16 MiB threshold. On 4
    ranks with 4 calibration batches (one per rank, one tree node each) every rank receives 3 chunks of
    1024 rows·4096·4 B = 16 MiB; host-offloaded partials add as many device copies of the sent chunks.
    On 2 ranks the plain path: the owner's receive buffer of the whole 64 MiB."""
    plan = estimate(PlanSpec(model=ModelShape.from_config(WIDE), nodes=1, gpus_per_node=gpus, seq_len=16,
                             micro_batch=2, calib_samples=8, method="sparsegpt", pbs="off",
                             stats_offload=stats_offload))
    terms = {(t.phase, t.name): t for t in plan.terms if t.step == "prune"}
    MiB = 1024 ** 2
    if gpus == 2:
        assert terms[("solve", "reduction receive buffer (owner)")].bytes == 64 * MiB
        assert not [k for k in terms if k[0] == "reduce"]
        return
    buf = terms[("reduce", "reduce-scatter chunk buffers (largest group)")]
    assert buf.where == "accel" and buf.bytes == (2 if stats_offload == "cpu" else 1) * 3 * 16 * MiB
    own = terms[("reduce", "own statistics partials during the reduction (1 per group)")]
    # one node per rank of every group: q/k/v, o_proj and gate/up inputs (2048²·4 B = 16 MiB each), down_proj's
    assert own.bytes == (3 * 16 + 64) * MiB
    assert own.where == ("host" if stats_offload == "cpu" else "accel")
    assert ("solve", "reduction receive buffer (owner)") not in terms


@pytest.mark.parametrize("stats_offload, where", [("disk", "disk"), ("cpu", "host")])
@pytest.mark.parametrize("stats_dtype", ["float32", "float64"])
def test_carried_hessians_hand_computed(stats_offload, where, stats_dtype):
    """prune.hessian_carry: on 2 ranks the down projection's input group (200² entries, the largest) goes to one
    rank and the other three groups (96² each) to the other, and the owners shift by one rank per block
    (distributed/multirank.py, rotation = block index): of the 3 blocks, rank 0 owns the down group of
    blocks 0 and 2 and the three others of block 1, so it keeps (2·200² + 3·96²) float32 entries (whatever
    the statistics dtype), where the offload puts them."""
    shape = ModelShape.from_config(TINY)
    kw = dict(model=shape, nodes=1, gpus_per_node=2, zero_stage=3, dtype="float32", seq_len=16, micro_batch=2,
              calib_samples=8, method="foresight", pbs="off", reconstruct="obs", stats_offload=stats_offload,
              stats_dtype=stats_dtype)
    terms = {t.name: t for t in estimate(PlanSpec(**kw, hessian_carry=True)).terms}
    carried = terms["carried XᵀX of every block (prune.hessian_carry, worst owner)"]
    assert carried.bytes == (2 * 200 * 200 + 3 * 96 * 96) * 4 and carried.where == where and carried.phase == "resident"
    assert not any("carried" in t.name for t in estimate(PlanSpec(**kw)).terms)


def _live_activation_bytes(bs, seq):
    """Bytes of the distinct storages of the live 3-D ``[bs, seq, ·]`` float tensors (calibration activations)."""
    import gc

    seen = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.dim() == 3 and tuple(o.shape[:2]) == (bs, seq) and o.is_floating_point():
            st = o.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("propagate", ["pruned", "true_sequential"])
def test_calibration_activation_term_matches_a_measured_prune_step(propagate):
    """The host term for a prune step's calibration activations against the peak of the activations a real
    prune step holds (measured after every block forward of a tiny Llama, one process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from xpert_dist.models import structure as st
    from xpert_dist.prune.oneshot import prune

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    rows, seq, bs = 8, 16, 2
    ids = torch.randint(0, 300, (rows, seq), generator=torch.Generator().manual_seed(0))
    peak = [0]
    handles = [b.register_forward_hook(lambda *_a: peak.__setitem__(0, max(peak[0], _live_activation_bytes(bs, seq))))
               for b in st.blocks(model)]
    prune(model, "wanda", 0.5, ids, batch_size=bs, progress=False, propagate=propagate)
    for h in handles:
        h.remove()
    plan = estimate(PlanSpec(model=ModelShape.from_config(TINY), nodes=1, gpus_per_node=1, zero_stage=0,
                             dtype="float32", accelerator="cpu", seq_len=seq, micro_batch=bs, calib_samples=rows,
                             method="wanda", pbs="off", propagate=propagate))
    (term,) = [t.bytes for t in plan.terms if t.step == "prune" and t.name.startswith("calibration")]
    assert peak[0] == term, (peak[0], term)
