"""Command line of one xpert-dist job (``launchers/run.py``, ``xpert-dist run``).

    python launchers/run.py --config configs/default_health.yaml prune.sparsity=0.5
    torchrun --nproc_per_node 2 launchers/run.py --config cfg.yaml
    deepspeed --num_gpus 2 launchers/run.py --ds_config ds_configs/zero3.json --config cfg.yaml
    srun python launchers/run.py --config cfg.yaml          (inside an sbatch allocation)

Overrides are ``section.key=value`` (YAML values) and may come before, between or after the
options (``output_dir=x --no-progress``). ``--ds_config`` is the same as ``ds_config=PATH``.
"""
import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML or JSON run config")
    ap.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON (ZeRO-2/3)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    ap.add_argument("--reference", metavar="RUN_DIR", help="a finished dense-LoRA run: report.md shows its "
                    "metrics and this run's retention (= eval.reference_run=RUN_DIR)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    args = ap.parse_intermixed_args(argv)  # options may follow overrides
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from xpert_dist.config import load_config
    from xpert_dist.errors import XpertError
    from xpert_dist.launch import signals

    overrides = list(args.overrides) + ([f"ds_config={args.ds_config}"] if args.ds_config else []) \
        + ([f"eval.reference_run={args.reference}"] if args.reference else [])
    try:
        cfg = load_config(args.config, overrides)
        from xpert_dist.launch.runner import run_job

        results = run_job(cfg, progress=not args.no_progress)
    except signals.Preempted as e:
        print(f"xpert-dist: preempted: {e}", file=sys.stderr)
        return signals.exit_code(e)
    except XpertError as e:
        print(f"xpert-dist: error: {e}", file=sys.stderr)
        return 2
    if results and "metrics" in results:
        print(f"report: {os.path.join(cfg.output_dir, 'report.md')}")
    return 0
