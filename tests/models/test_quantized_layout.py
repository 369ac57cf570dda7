"""A 4-bit (NF4) base keeps the layout pruning reads and writes through eval-mode forwards: on CPUs with
AVX512-BF16, bitsandbytes would otherwise repack the weight for its CPU kernel on the first eval forward,
and ``structure.base_weight`` would dequantise the packed bytes as NF4 codes (on such a machine the QLoRA
pipeline tests then export ~1,000 non-zero pruned entries per matrix). On a CPU without AVX512-BF16
bitsandbytes never repacks, and the equality below holds either way."""
import torch

from xpert_dist.config import ModelConfig
from xpert_dist.models import structure as st
from xpert_dist.models.loading import load_model

from helpers import tiny_model


def test_eval_forward_leaves_the_nf4_weight_readable(tmp_path):
    src = tmp_path / "tiny"
    tiny_model().save_pretrained(src)
    model = load_model(ModelConfig(tiny=None, name_or_path=str(src), quantization="4bit"), seed=0)
    q = st.blocks(model)[0].self_attn.q_proj
    assert st.quantization_of(q) == "4bit"
    before = st.base_weight(q, torch.float32).clone()
    keep = before.abs() > before.abs().median()
    st.set_base_weight(q, before * keep, lambda p, v: None)  # what a prune step writes
    pruned = st.base_weight(q, torch.float32).clone()
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(3, 19).reshape(2, 8))
    after = st.base_weight(q, torch.float32)
    assert torch.equal(after, pruned)
    assert float(after[~keep].abs().max()) == 0.0
    assert all(not getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
