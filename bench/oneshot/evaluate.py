"""Score one cell (our venv, for every implementation): perplexity of the (pruned) model on the fixed windows.

    python bench/oneshot/evaluate.py --out E.json [--weights W.safetensors] [--pattern 2:4] [--quick]
Without --weights: the dense model. With them: the pruned linears replace the dense ones, and their
sparsity (and N:M validity) is measured here, the same way for every implementation.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.REPO))


def nm_violations(w: torch.Tensor, n: int, m: int) -> int:
    """Groups of m consecutive inputs (per row) with more than n non-zeros."""
    groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
    return int((groups > n).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    from safetensors.torch import load_file
    from xpert_dist.config import ModelConfig
    from xpert_dist.eval.perplexity import perplexity
    from xpert_dist.models.loading import load_model

    model = load_model(ModelConfig(name_or_path=str(common.model_dir())))
    result: dict = {}
    if args.weights:
        pruned = load_file(args.weights)
        names = common.pruned_weight_names(model.config.num_hidden_layers)
        if sorted(pruned) != sorted(names):
            raise SystemExit(f"{args.weights}: expected the {len(names)} block linears, got {len(pruned)} tensors")
        sp = {n: float((pruned[n] == 0).double().mean()) for n in names}
        result["sparsity_mean"] = sum(sp.values()) / len(sp)
        result["sparsity_min"], result["sparsity_max"] = min(sp.values()), max(sp.values())
        if args.pattern != "unstructured":
            n, m = (int(x) for x in args.pattern.split(":"))
            result["nm_violations"] = sum(nm_violations(pruned[k], n, m) for k in names)
        digest = hashlib.sha256()
        for k in names:  # the masks (non-zero pattern) of all pruned matrices, in a fixed order
            digest.update(np.packbits((pruned[k] != 0).numpy().ravel()).tobytes())
        result["mask_sha256"] = digest.hexdigest()
        missing, unexpected = model.load_state_dict(pruned, strict=False)
        assert not unexpected, unexpected
    result["ppl"], result["eval_seconds"] = {}, {}
    for name in common.EVALS:
        windows = torch.load(common.eval_file(args.quick, name))
        t0 = time.perf_counter()
        result["ppl"][name] = perplexity(model, windows, batch_size=4, progress=False)
        result["eval_seconds"][name] = time.perf_counter() - t0
        result.setdefault("windows", {})[name] = list(windows.shape)
    common.write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
