"""Command line of the 70B rehearsal (``python -m bench.rehearsal_70b`` or ``python bench/rehearsal_70b/run.py``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench.rehearsal_70b as _pkg  # noqa: E402
from bench.rehearsal_70b.blocks import ALL_RUNS, harness  # noqa: E402
from bench.rehearsal_70b.common import RESULTS, SHAPES  # noqa: E402
from bench.rehearsal_70b.micro import MATRICES, PARTS, micro, micro_part  # noqa: E402
from bench.rehearsal_70b.pipeline import pipeline  # noqa: E402
from bench.rehearsal_70b.report import report, write  # noqa: E402

__doc__ = _pkg.__doc__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--matrices", nargs="*", default=list(MATRICES))
    m.add_argument("--parts", nargs="*", default=list(PARTS))
    m.add_argument("--rows", type=int, default=None, help="build and time this many rows of W (scaled)")
    m.add_argument("--fresh", action="store_true")
    h = sub.add_parser("harness")
    h.add_argument("--shape", default="70b-quarter", choices=list(SHAPES))
    h.add_argument("--layers", type=int, default=2)
    h.add_argument("--seq-len", type=int, default=64)
    h.add_argument("--calib-samples", type=int, default=4)
    h.add_argument("--steps", type=int, default=2)
    h.add_argument("--prune-runs", nargs="*", default=ALL_RUNS, choices=ALL_RUNS)
    h.add_argument("--fresh", action="store_true")
    pl = sub.add_parser("pipeline")
    pl.add_argument("--shape", default="70b-quarter", choices=list(SHAPES))
    pl.add_argument("--layers", type=int, default=1)
    pl.add_argument("--method", default="foresight")
    pl.add_argument("--pbs", default="full")
    pl.add_argument("--fresh", action="store_true")
    sub.add_parser("report")
    ex = sub.add_parser("extrapolate", help="bench/results/extrapolation_70b.*: the shipped recipe's time at 70B "
                                            "(arithmetic, assumed GPU throughputs; no cell)")
    ex.add_argument("--world", type=int, default=32, help="GPUs (slurm/prune_70b.sh: 4 nodes x 8)")
    mp = sub.add_parser("_micro_part")
    mp.add_argument("matrix")
    mp.add_argument("part")
    mp.add_argument("rows", type=int, nargs="?", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "_micro_part":
        print(json.dumps(micro_part(args.matrix, args.part, rows=args.rows)))
        return 0
    if args.cmd == "harness":
        harness(args.shape, args.layers, args.seq_len, args.calib_samples, args.steps, args.prune_runs,
                fresh=args.fresh)
        return 0
    if args.cmd == "pipeline":
        rec = pipeline(args.shape, args.layers, args.method, args.pbs, fresh=args.fresh)
        return 0 if rec["rc"] == 0 else 1
    if args.cmd == "report":
        res = report()
        write(res)
        print((RESULTS / "rehearsal_70b.md").read_text())
        return 0
    if args.cmd == "extrapolate":
        from bench.rehearsal_70b.extrapolate import write_extrapolation

        print(write_extrapolation(world=args.world))
        return 0
    if args.cmd == "micro":
        micro(args.matrices, args.parts, fresh=args.fresh, rows=args.rows)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
