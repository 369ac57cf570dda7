#!/usr/bin/env python
"""Analyses over models and finished runs: domain structural shift, mask transfer, run comparison.

    python launchers/analyze.py shift --model smollm2 --domains general,health,legal \\
        --method foresight --sparsity 0.4,0.5 --calib-samples 32 --adapt-steps 12 --out runs/shift
    python launchers/analyze.py transfer --shift-dir runs/shift --targets health,legal --out runs/transfer
    python launchers/analyze.py compare runs/dense runs/xpert runs/wanda --out runs/compare --reference dense

Every subcommand caches what it computes under its output directory and resumes on a rerun.
``shift`` writes shift.md (+ PNG heat maps / per-layer curves, shift.json, CSVs); ``transfer`` writes
transfer.md (+ JSON, CSV, PNG); ``compare`` writes comparison.md (+ PNGs). See docs/analysis.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _model_config(args):
    import yaml

    from xpert_dist.config import ModelConfig

    if args.tiny is not None:
        tiny = yaml.safe_load(args.tiny) if args.tiny.strip() else {}
        return ModelConfig(tiny=tiny or {}, dtype=args.dtype)
    return ModelConfig(name_or_path=args.model, dtype=args.dtype)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (offline SmolLM2-135M), a local dir, hub name or .gguf")
    p.add_argument("--tiny", nargs="?", const="", default=None, metavar="YAML",
                   help="use a tiny random Llama instead (optional LlamaConfig overrides as YAML, e.g. '{num_hidden_layers: 2}')")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def cmd_shift(args) -> int:
    from xpert_dist.analysis.shift import ShiftConfig, parse_domains, run_shift
    from xpert_dist.config import LoraSettings

    cfg = ShiftConfig(
        out_dir=args.out, domains=parse_domains(args.domains), model=_model_config(args), method=args.method,
        sparsities=args.sparsity, group=args.group, variant=args.variant, calibration=args.calibration,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, batch_size=args.batch_size,
        adapt_steps=args.adapt_steps, adapt_batch_size=args.adapt_batch_size, adapt_seq_len=args.adapt_seq_len,
        adapt_lr=args.adapt_lr, adapt_max_train_samples=args.adapt_max_train_samples,
        adapt_domains=_names(args.adapt_domains) if args.adapt_domains else None,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha), text_field=args.text_field,
        reference_domain=args.reference_domain, runs=args.runs or [], seed=args.seed, progress=not args.no_progress)
    run_shift(cfg, command=args.command_line)
    print(f"report: {os.path.join(args.out, 'shift.md')}")
    return 0


def cmd_transfer(args) -> int:
    from xpert_dist.analysis.transfer import TransferConfig, run_transfer

    own = {}
    for item in args.own_run or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--own-run expects DOMAIN=RUN_DIR, got {item!r}")
        own[name.strip()] = path.strip()
    cfg = TransferConfig(shift_dir=args.shift_dir, out_dir=args.out, targets=_names(args.targets) if args.targets else None,
                         sparsities=args.sparsity, sources=_names(args.sources), own_runs=own,
                         perplexity_windows=args.perplexity_windows, perplexity_seq_len=args.perplexity_seq_len,
                         max_task_examples=args.max_task_examples, eval_batch_size=args.eval_batch_size,
                         tasks=args.tasks, progress=not args.no_progress)
    run_transfer(cfg, command=args.command_line)
    print(f"report: {os.path.join(args.out, 'transfer.md')}")
    return 0


def cmd_compare(args) -> int:
    from xpert_dist.analysis.compare import write_comparison_page

    path = write_comparison_page(args.runs, args.out, reference=args.reference)
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("shift", help="domain structural shift of masks and scores (before/after adaptation)")
    _add_model(p)
    p.add_argument("--domains", default="general,health,legal",
                   help="comma-separated aliases or dataset specs; name=spec to name one")
    p.add_argument("--method", default="foresight", choices=["foresight", "wanda", "magnitude"])
    p.add_argument("--sparsity", type=_floats, default=[0.4, 0.5], help="comma-separated, e.g. 0.4,0.5")
    p.add_argument("--group", default="output", choices=["output", "input", "layer"])
    p.add_argument("--variant", default="exact", choices=["exact", "reference"])
    p.add_argument("--calibration", default="dense", choices=["dense", "sequential"],
                   help="dense: stats from full forwards of the dense model (one pass per domain); sequential: "
                        "the Pruner's block-by-block final step per sparsity (pipeline-exact, slower)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="calibration forward batch")
    p.add_argument("--adapt-steps", type=int, default=20, help="LoRA steps per domain (0: no 'after' phase)")
    p.add_argument("--adapt-domains", default=None, help="comma-separated domain names to adapt (default: all)")
    p.add_argument("--adapt-batch-size", type=int, default=4)
    p.add_argument("--adapt-seq-len", type=int, default=256)
    p.add_argument("--adapt-lr", type=float, default=2e-4)
    p.add_argument("--adapt-max-train-samples", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--text-field", default="text")
    p.add_argument("--reference-domain", default="general",
                   help="domain whose base-model mask is compared with every adapted mask")
    p.add_argument("--runs", nargs="*", help="run dirs whose prune reports give mask movement between prune steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_shift)

    p = sub.add_parser("transfer", help="retention of adapted models pruned with masks from other data")
    p.add_argument("--shift-dir", required=True, help="output dir of a finished `shift` (its cache is reused)")
    p.add_argument("--targets", default=None, help="adapted domains to prune (default: adapted non-reference ones)")
    p.add_argument("--sparsity", type=_floats, default=None, help="default: the shift's sparsities")
    p.add_argument("--sources", default="before:general,after:other,after:self,run:own",
                   help="mask sources: before:D / after:D (D a domain, 'self' or 'other'), run:own, run:PATH")
    p.add_argument("--own-run", action="append", metavar="DOMAIN=RUN_DIR",
                   help="the domain's EfficientXpert run (its masks.safetensors), for source run:own")
    p.add_argument("--tasks", default=None, help="DOMAIN=task,... e.g. health=pubmedqa,legal=casehold (default)")
    p.add_argument("--perplexity-windows", type=int, default=8)
    p.add_argument("--perplexity-seq-len", type=int, default=256)
    p.add_argument("--max-task-examples", type=int, default=40)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_transfer)

    p = sub.add_parser("compare", help="one markdown page comparing finished runs")
    p.add_argument("runs", nargs="+", help="run directories (each with results.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--reference", default=None, help="name of the dense-LoRA run retention is measured against")
    p.set_defaults(fn=cmd_compare)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "python launchers/analyze.py " + " ".join(shlex.quote(a) for a in argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from xpert_dist.errors import XpertError

    try:
        return args.fn(args)
    except XpertError as e:
        print(f"xpert-dist analyze: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
