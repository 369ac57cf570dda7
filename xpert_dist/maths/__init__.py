"""Pure tensor maths: scores, consumer factors, masks, SparseGPT and Partial Brain Surgeon.

Tensors in, tensors out; no torch.distributed / transformers / peft / deepspeed imports here.
"""

from xpert_dist.maths.consumers import (
    consumer_factors,
    foresight_exact_scores,
    foresight_reference_scores,
)
from xpert_dist.maths.masks import (
    nm_mask,
    owl_outlier_ratio,
    owl_sparsities,
    parse_pattern,
    prune_count,
    select_mask,
    sparsity_of,
)
from xpert_dist.maths.pbs import pbs_diagonal, pbs_full, pbs_objective, pbs_shared_gram
from xpert_dist.maths.scores import (
    check_finite,
    ema_scores,
    foresight_scores,
    magnitude_scores,
    wanda_scores,
)
from xpert_dist.maths.sparsegpt import sparsegpt_prune

__all__ = [
    "check_finite", "magnitude_scores", "wanda_scores", "foresight_scores", "ema_scores",
    "consumer_factors", "foresight_exact_scores", "foresight_reference_scores",
    "select_mask", "nm_mask", "parse_pattern", "prune_count", "owl_outlier_ratio",
    "owl_sparsities", "sparsity_of",
    "sparsegpt_prune",
    "pbs_diagonal", "pbs_full", "pbs_shared_gram", "pbs_objective",
]
