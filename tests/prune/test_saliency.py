"""``prune.saliency=obs`` through a real Pruner step on a tiny LoRA Llama: the mask keeps, per output row,
the entries of largest Optimal-Brain-Surgeon saliency ``U[j,i]² / [(XᵀX + λI)⁻¹]_ii``, computed here in
float64 from a Hessian captured independently by a forward hook; ``diag`` (ForeSight's METHOD.md form)
chooses another mask on the same model."""
import pytest
import torch

from xpert_dist.config import PruneConfig, RunConfig, validate
from xpert_dist.errors import ConfigError
from xpert_dist.maths import masks
from xpert_dist.models import structure as st
from xpert_dist.prune.pruner import Pruner

from helpers import block0_hessian, lora_model, q0

NAME = "model.layers.0.self_attn.q_proj"


def step(saliency):
    model = lora_model()
    ids = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(1))
    H = block0_hessian(model, ids)
    U = st.effective_weight(q0(model)).double()
    cfg = PruneConfig(method="foresight", sparsity=0.5, group="output", pbs="off", saliency=saliency,
                      ema_eta=1.0, offload="none", stats_dtype="float64", solver_dtype="float64")
    pruner = Pruner(cfg, batch_size=4, progress=False)
    pruner.step(model, ids, 0.5)
    return pruner.masks[NAME], U, H


def test_obs_saliency_mask_is_the_per_row_obs_top_k():
    keep, U, H = step("obs")
    hd = H.diagonal().clone()
    dead = hd == 0
    Hd = H.clone()
    Hd[dead, dead] = 1.0
    Hd += 0.01 * torch.where(dead, torch.ones_like(hd), hd).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    saliency = U.square() / torch.linalg.inv(Hd).diagonal()[None, :]
    k = masks.prune_count(0.5, U.shape[1])
    want = torch.ones_like(keep)
    for j in range(U.shape[0]):
        want[j, saliency[j].argsort()[:k]] = False
    assert torch.equal(keep, want)
    keep_diag, _, _ = step("diag")
    assert not torch.equal(keep, keep_diag)  # correlated inputs: the re-fit changes which entries go


def test_saliency_config_is_checked_at_the_edge():
    cfg = RunConfig()
    cfg.prune.method, cfg.prune.saliency = "wanda", "obs"
    with pytest.raises(ConfigError, match="prune.saliency=obs rescales ForeSight"):
        validate(cfg)
    cfg.prune.method, cfg.prune.saliency = "foresight", "hessian"
    with pytest.raises(ConfigError, match="prune.saliency"):
        validate(cfg)
