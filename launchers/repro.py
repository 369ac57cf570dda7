#!/usr/bin/env python
"""Compare finished runs: pruning masks must be identical; losses and metrics are tabulated.

    python launchers/repro.py runs/repro/ws1 runs/repro/ws2 runs/repro/ws1-repeat [--out REPORT.md]

Exit status: 0 masks identical (and within --loss-tol/--metric-tol when given), 1 masks differ
(the differing matrices are printed), 3 a tolerance was exceeded, 2 a manifest is missing.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished run directories (each with manifest.json)")
    ap.add_argument("--labels", help="comma-separated names for the runs (default: directory names)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--loss-tol", type=float, default=None, help="fail (exit 3) if final losses differ more")
    ap.add_argument("--metric-tol", type=float, default=None, help="fail (exit 3) if a metric differs more")
    args = ap.parse_args(argv)

    from xpert_dist.launch import repro

    labels = args.labels.split(",") if args.labels else None
    try:
        rep = repro.compare_runs(args.runs, labels, loss_tol=args.loss_tol, metric_tol=args.metric_tol)
    except (repro.ManifestError, ValueError) as e:
        print(f"repro: error: {e}", file=sys.stderr)
        return repro.EXIT_UNREADABLE
    text = rep.markdown()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if not rep.masks_identical:
        print("repro: masks differ in: " + ", ".join(rep.mask_mismatches), file=sys.stderr)
    elif rep.tolerance_failures:
        print("repro: " + "; ".join(rep.tolerance_failures), file=sys.stderr)
    return rep.exit_code


if __name__ == "__main__":
    sys.exit(main())
