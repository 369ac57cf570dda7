#!/usr/bin/env python
"""Submit xpert-dist runs with submitit (SLURM, or locally for testing).

    # one job (cluster settings from configs/llama7b_health.slurm.yaml or configs/slurm.yaml)
    python launchers/submit.py run --config configs/llama7b_health.yaml prune.sparsity=0.5

    # a job array over the cartesian product of the grid (here 2 x 3 = 6 runs)
    python launchers/submit.py sweep --config configs/llama7b_health.yaml \\
        --grid prune.sparsity=0.4,0.5 train.seed=0,1,2

    # the same config on 1 process, 1 node x 2 ranks, 2 nodes x 1 rank, plus one rerun, then one
    # report (train.batch_size is the global batch, so every layout trains on the same rows; add
    # train.reproducible=true for bit-identical training, see README "Determinism")
    python launchers/submit.py repro --config cfg.yaml --layouts 1x1,1x2,2x1 --repeats 1 \
        --report bench/results/repro train.reproducible=true

Cluster parameters never go into the run config: they come from ``--cluster FILE`` (a YAML with
a ``slurm:`` section; default: ``<config>.slurm.yaml`` or ``slurm.yaml`` next to the config) and
the flags below, which win. ``--executor local`` runs the jobs as local processes, ``debug`` in
this process. Jobs are ``Checkpointable``: on preemption or time-out they checkpoint and requeue
themselves, and the pipeline resumes from ``output_dir/checkpoints``.

Exit status: 0 submitted (or, with --wait, all succeeded), 1 a job failed, 2 bad arguments or
config, and for ``repro`` the status of the comparison (launchers/repro.py: 1 different,
4 within float noise where --require identical).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config (YAML/JSON)")
    p.add_argument("--cluster", help="YAML with a slurm: section (default: found next to --config)")
    p.add_argument("--executor", choices=("slurm", "local", "debug"), default="slurm")
    p.add_argument("--folder", help="submitit log folder (default: slurm.folder, runs/submitit/%%j)")
    g = p.add_argument_group("cluster settings (override the YAML)")
    g.add_argument("--partition")
    g.add_argument("--nodes", type=int)
    g.add_argument("--tasks-per-node", dest="tasks_per_node", type=int, help="processes per node (= GPUs)")
    g.add_argument("--gpus-per-node", dest="gpus_per_node", type=int)
    g.add_argument("--cpus-per-task", dest="cpus_per_task", type=int)
    g.add_argument("--mem", help="memory per node, e.g. 480G")
    g.add_argument("--time", help="time limit: minutes or HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--signal-delay-s", dest="signal_delay_s", type=int,
                   help="warning signal this many seconds before the time limit (default 300)")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--job-name", dest="job_name")
    p.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    p.add_argument("--wait-timeout", type=float, default=None, help="stop waiting after this many seconds")
    p.add_argument("overrides", nargs="*", help="run config overrides key=value")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="submit one job")
    _add_common(p_run)
    p_run.add_argument("--wait", action="store_true", help="wait for the job and report its outcome")
    p_sweep = sub.add_parser("sweep", help="submit a job array over a grid of overrides")
    _add_common(p_sweep)
    p_sweep.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                         help="swept keys with their values (cartesian product); give run-config "
                              "overrides before --grid, or after --")
    p_sweep.add_argument("--array-parallelism", dest="array_parallelism", type=int,
                         help="max array elements running at once")
    p_sweep.add_argument("--wait", action="store_true", help="wait for all jobs and report")
    p_repro = sub.add_parser("repro", help="same config at several world sizes + repeats, then compare")
    _add_common(p_repro)
    p_repro.add_argument("--layouts", help="comma-separated NODESxTASKS, e.g. 1x1,1x2,2x1 (wins over --world-sizes)")
    p_repro.add_argument("--world-sizes", default="1,2", help="comma-separated, e.g. 1,2,4 (one node while it fits)")
    p_repro.add_argument("--repeats", type=int, default=1, help="reruns of the first layout")
    p_repro.add_argument("--loss-tol", type=float, default=None)
    p_repro.add_argument("--require", choices=("identical", "noise"), default="identical",
                         help="verdict needed for exit 0 (see launchers/repro.py)")
    p_repro.add_argument("--report", help="write the report as REPORT.md and REPORT.json (default: "
                                          "<output_dir>/repro/REPORT.md and .json)")
    args = ap.parse_args(argv)

    from xpert_dist.errors import XpertError
    from xpert_dist.launch import cluster, repro, submission

    flag_names = ("partition", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem", "time",
                  "signal_delay_s", "account", "qos", "job_name", "array_parallelism")
    flags = {k: getattr(args, k, None) for k in flag_names}
    try:
        settings = cluster.load_settings(args.cluster, args.config, flags)
        if args.cmd == "run":
            plans = submission.plan_run(args.config, args.overrides, settings)
        elif args.cmd == "sweep":
            plans = submission.plan_sweep(args.config, args.overrides, args.grid, settings)
        else:
            layouts = [x for x in (args.layouts or args.world_sizes).split(",") if x.strip()]
            plans = submission.plan_repro(args.config, args.overrides, layouts, settings, args.repeats)
        if args.executor != "slurm":
            for p in plans:
                cluster.executor_parameters(p.settings, args.executor)  # e.g. local: one node only
    except (XpertError, ValueError) as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 2

    if (args.cmd == "repro" and len(set(p.world_size for p in plans)) > 1 and plans[0].config["lora"]["dropout"] > 0
            and not plans[0].config["train"]["reproducible"]):
        print(f"note: lora.dropout={plans[0].config['lora']['dropout']} draws its noise per rank outside "
              f"train.reproducible=true, so masks can differ across world sizes", file=sys.stderr)
    print(f"{len(plans)} job(s), executor {args.executor}:")
    for p in plans:
        print("  " + submission.describe(p))
    if args.dry_run:
        return 0

    jobs = submission.submit_plans(plans, args.executor, args.folder, as_array=args.cmd == "sweep")
    if args.cmd != "repro" and not args.wait:
        return 0
    outcomes = submission.wait_plans(plans, jobs, timeout_s=args.wait_timeout)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} job(s) failed: "
              + ", ".join(f"{o.job_id} ({o.label})" for o in failed), file=sys.stderr)
        return 1
    if args.cmd != "repro":
        return 0
    rep = repro.compare_runs([p.output_dir for p in plans], [p.label for p in plans], loss_tol=args.loss_tol,
                             require=args.require)
    text = rep.markdown()
    print(text)
    stem = args.report or os.path.join(os.path.dirname(plans[0].output_dir), "REPORT")
    from xpert_dist.utils.atomic import atomic_write_json, atomic_write_text

    atomic_write_text(stem + ".md", text)
    atomic_write_json(stem + ".json", rep.to_dict())
    print(f"report: {stem}.md, {stem}.json")
    for c in rep.comparisons:
        if c.verdict != "identical":
            print(f"repro: {c.label}: {c.verdict} {'; '.join(c.reasons)}", file=sys.stderr)
    return rep.exit_code


if __name__ == "__main__":
    sys.exit(main())
