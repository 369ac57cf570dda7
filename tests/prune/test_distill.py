"""prune.distill=logits: the training loss gains w·KL(teacher ‖ student) with the teacher frozen as the
model was when attached; oracle: the loss recomputed by hand (plain CE and a float64 KL)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from xpert_dist.config import LoraSettings, config_from_dict
from xpert_dist.errors import ConfigError
from xpert_dist.models.lora import wrap_lora
from xpert_dist.prune.distill import LogitDistiller

from helpers import tiny_model

IDS = torch.arange(2 * 12).reshape(2, 12) % 200 + 3


def test_loss_is_ce_plus_weighted_kl_to_the_frozen_teacher():
    model = wrap_lora(tiny_model(), LoraSettings(r=4, alpha=8, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model).merge_and_unload().eval()  # the model when the distiller attaches
    d = LogitDistiller(model, weight=0.7)
    for n, p in model.named_parameters():  # training moves the student; the teacher must not follow
        if "lora_A" in n:
            p.data.add_(0.3)
    labels = IDS.clone()
    labels[0, :4] = -100
    n_items = int((labels[:, 1:] != -100).sum())
    model.train()
    out = model(input_ids=IDS, labels=labels, num_items_in_batch=n_items)
    with torch.no_grad():
        t = reference(input_ids=IDS).logits.double()
        s = out.logits.detach().double()
    valid = labels[:, 1:] != -100
    ce = F.cross_entropy(s[:, :-1][valid], labels[:, 1:][valid], reduction="sum") / n_items
    pt = t[:, :-1].softmax(-1)
    kl = (pt * (pt.log() - s[:, :-1].log_softmax(-1))).sum(-1)[valid].sum() / n_items
    assert float(out.loss) == pytest.approx(float(ce + 0.7 * kl), rel=1e-5)
    assert float(kl) > 1e-4  # the student did move away from the teacher
    out.loss.backward()  # differentiable through the KL term
    model.eval()  # evaluation forwards are untouched
    assert float(model(input_ids=IDS, labels=labels).loss) == pytest.approx(
        float(F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1])[valid.reshape(-1)],
                              labels[:, 1:][valid])), rel=1e-5)
    d.remove()


def test_refused_with_deepspeed_or_quantisation(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    with pytest.raises(ConfigError, match="prune.distill"):
        config_from_dict({"ds_config": str(ds), "prune": {"distill": "logits"}})
    with pytest.raises(ConfigError, match="prune.distill"):
        config_from_dict({"model": {"quantization": "4bit"}, "prune": {"distill": "logits"}})
    with pytest.raises(ConfigError, match="prune.distill"):
        config_from_dict({"prune": {"distill": "squarehead"}})
