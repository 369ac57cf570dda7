#!/usr/bin/env python
"""Compare finished runs: masks (per matrix and in total), losses and metrics, with a verdict.

    python launchers/repro.py runs/repro/1x1 runs/repro/1x2 runs/repro/1x1-rerun1 [--out REPORT.md] [--json R.json]

Every run is compared with the first: fraction of mask entries that differ and IoU of the kept
sets (from masks.safetensors), the relative loss difference per step (results.json), the
metrics; the verdict is "identical", "within float noise" (thresholds documented in
xpert_dist/launch/repro.py) or "different".

Exit status: 0 the verdict meets --require (default identical; --require noise also accepts
"within float noise"), 4 within float noise but identical required, 1 different, 3 a
--loss-tol/--metric-tol was exceeded, 2 a manifest is missing or unreadable.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished run directories (each with manifest.json)")
    ap.add_argument("--labels", help="comma-separated names for the runs (default: directory names)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--json", help="also write the report as JSON here")
    ap.add_argument("--require", choices=("identical", "noise"), default="identical",
                    help="verdict needed for exit 0 (noise: identical or within float noise)")
    ap.add_argument("--loss-tol", type=float, default=None, help="fail (exit 3) if final losses differ more")
    ap.add_argument("--metric-tol", type=float, default=None, help="fail (exit 3) if a metric differs more")
    args = ap.parse_args(argv)

    from xpert_dist.errors import ConfigError
    from xpert_dist.launch import repro
    from xpert_dist.utils.atomic import atomic_write_json

    labels = args.labels.split(",") if args.labels else None
    try:
        rep = repro.compare_runs(args.runs, labels, loss_tol=args.loss_tol, metric_tol=args.metric_tol,
                                 require=args.require)
    except (repro.ManifestError, ConfigError, ValueError) as e:
        print(f"repro: error: {e}", file=sys.stderr)
        return repro.EXIT_UNREADABLE
    text = rep.markdown()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        atomic_write_json(args.json, json.loads(json.dumps(rep.to_dict(), default=str)))
    for c in rep.comparisons:
        if c.verdict != "identical":
            print(f"repro: {c.label}: {c.verdict}" + (f" ({'; '.join(c.reasons)})" if c.reasons else "")
                  + (f"; masks differ in: {', '.join(c.hash_mismatches[:10])}" if c.hash_mismatches else ""),
                  file=sys.stderr)
    if rep.tolerance_failures:
        print("repro: " + "; ".join(rep.tolerance_failures), file=sys.stderr)
    return rep.exit_code


if __name__ == "__main__":
    sys.exit(main())
