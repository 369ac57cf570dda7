"""Compensation that survives export (issue 10), through a real Pruner step on a tiny LoRA Llama:
``prune.reconstruct=obs`` and ``prune.pbs_order=base`` land in the kept base weights, B restarts
at 0; oracles are the maths functions fed with a Hessian captured independently here (float64, by a
forward hook on the dense model), whose own oracles are in tests/maths (SparseGPT, lstsq)."""
import pytest
import torch

from xpert_dist.config import PruneConfig
from xpert_dist.maths.pbs import pbs_full, pbs_into_base
from xpert_dist.maths.reconstruct import obs_reconstruct
from xpert_dist.models import structure as st
from xpert_dist.prune.pruner import Pruner

from helpers import block0_hessian, lora_model, q0

NAME = "model.layers.0.self_attn.q_proj"


def run_step(**options):
    model = lora_model()
    ids = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(1))
    H = block0_hessian(model, ids)
    m = q0(model)
    A, B, s = st.lora_parts(m)
    U, A0 = st.effective_weight(m).double(), A.detach().double().clone()
    pruner = Pruner(PruneConfig(method="wanda", sparsity=0.5, group="output", offload="none", **options),
                    batch_size=4, progress=False)
    pruner.step(model, ids, 0.5)
    keep = pruner.masks[NAME]
    return model, H, U, A0, s, keep


def test_reconstruct_obs_updates_the_kept_base_weights():
    model, H, U, _, _, keep = run_step(pbs="off", reconstruct="obs", solver_dtype="float64")
    m = q0(model)
    got = st.base_weight(m).double()
    want = obs_reconstruct(U, H, keep)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert bool((got[~keep] == 0).all()) and float(st.lora_parts(m)[1].abs().max()) == 0.0
    assert not torch.allclose(got, U * keep)  # the kept weights did move


def test_pbs_base_order_full_lands_in_the_kept_base_weights():
    model, H, U, A0, s, keep = run_step(pbs="full", pbs_order="base", pbs_lambda=1e-8)
    m = q0(model)
    got = st.base_weight(m).double()
    dB = pbs_full(U, A0, keep, H, s, lam=1e-8, support="kept")
    want = pbs_into_base(U, A0, keep, dB, s, "full")
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert bool((got[~keep] == 0).all()) and float(st.lora_parts(m)[1].abs().max()) == 0.0
    # the layer's output error on the calibration inputs is below plain masking's
    err = ((got - U) @ H * (got - U)).sum()
    plain = ((U * keep - U) @ H * (U * keep - U)).sum()
    assert float(err) < float(plain)


def test_pbs_adapter_order_keeps_the_base_masked():
    """The existing convention, for contrast: base = U ⊙ M, the correction sits in B."""
    model, _, U, _, _, keep = run_step(pbs="full", pbs_order="adapter")
    m = q0(model)
    torch.testing.assert_close(st.base_weight(m).double(), U * keep, rtol=0, atol=1e-6)
    assert float(st.lora_parts(m)[1].abs().max()) > 0.0
