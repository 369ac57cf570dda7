"""``xpert-dist``: one command for the whole tool.

    xpert-dist run --config cfg.yaml [key=value ...]        the training/pruning job (= launchers/run.py)
    xpert-dist prune --model smollm2 --method wanda --sparsity 0.5 --calib general --out DIR
                                                            one-shot prune + export + perplexity
    xpert-dist plan --model-config llama2_70b --nodes 8 ...  memory plan (= python -m xpert_dist.plan)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _prune(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="xpert-dist prune", description="One-shot pruning of a model, then export.")
    ap.add_argument("--model", default="smollm2", help="local dir, hub name, .gguf file or 'smollm2'")
    ap.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt", "foresight"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--group", default="output")
    ap.add_argument("--calib", default="general", help="calibration data: alias or dataset spec")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval", default=None, help="held-out text for perplexity (alias or spec)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    from .config import DataConfig, ModelConfig
    from .data import sources, tokenize
    from .eval.perplexity import heldout_windows, perplexity
    from .models.loading import load_model, load_tokenizer
    from .prune.oneshot import prune
    from .train import export
    from .distributed.context import DistContext

    mcfg = ModelConfig(name_or_path=args.model)
    model, tok = load_model(mcfg), load_tokenizer(mcfg)
    texts = sources.texts_of(sources.load_records(args.calib), DataConfig())
    calib = tokenize.calibration_batch(texts, tok, args.calib_samples, args.calib_seq_len, seed=0)
    rep = prune(model, args.method, args.sparsity, calib, pattern=args.pattern, group=args.group)
    out = Path(args.out)
    sd = export.merged_state_dict(model, DistContext())
    export.save_hf_checkpoint(sd, model, tok, out / "model")
    result = {"method": args.method, "sparsity": args.sparsity, "pattern": args.pattern,
              "prune_seconds": rep.seconds, "mask_sha256": rep.mask_sha256}
    if args.eval:
        with torch.no_grad():
            result["perplexity"] = perplexity(model, heldout_windows(args.eval, tok, args.calib_seq_len,
                                                                     args.eval_windows))
    (out / "prune.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "mask_sha256"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if cmd == "run":
        from .launch.run_cli import main as run_main

        return run_main(rest)
    if cmd == "prune":
        return _prune(rest)
    if cmd == "plan":
        from .plan.__main__ import main as plan_main

        return plan_main(rest)
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
