"""70B dress rehearsal on CPU: Llama-2-70B-shaped matrices and blocks through the real code.

Three kinds of cells (each cached in bench/results/cache/, resumed on a rerun):

* ``micro``: single matrices at the exact 70B widths (``down_proj`` 8192 x 28672, ``q_proj``
  8192 x 8192, ``gate_proj`` 28672 x 8192) with a random SPD ``H = XᵀX`` (X: random correlated
  calibration tokens): time and peak RSS of each part of a prune step for that matrix (statistics,
  scores, mask, PBS full/diagonal, SparseGPT), with their FLOP counts; the previous
  ``pbs_full`` dense formula is timed on a row slice and scaled by rows (it is linear in them).
  One part per subprocess, so each peak RSS is that part's own.
* ``harness``: a random Llama with 70B-family block shapes (named in the cell) wrapped with LoRA
  r 8 on all seven linears, DeepSpeed ZeRO-3 over 2 gloo ranks (``ds_configs/zero3.json``), a
  few training steps, two in-loop prune steps with ForeSight + full-Hessian PBS (the second is the
  steady state the planner describes) and one SparseGPT prune step, through
  ``xpert_dist.prune.pruner.Pruner`` with timers wrapped around its parts; peak RSS per phase
  per rank (VmHWM after a reset), compared with ``python -m xpert_dist.plan`` for the same shapes.
* ``pipeline``: the real entry point, ``torchrun --nproc_per_node 2 launchers/run.py --ds_config
  ds_configs/zero3.json`` with ``model.tiny`` set to the cell's shape (tiny = random weights
  built in-process; it skips HfDeepSpeedConfig's zero.Init, every rank builds the model once):
  training steps, in-loop prune steps, the final prune, export and the reload of the export.

    python -m bench.rehearsal_70b micro            # single full-width matrices
    python -m bench.rehearsal_70b harness --shape 70b-quarter
    python -m bench.rehearsal_70b pipeline --shape 70b-quarter
    python -m bench.rehearsal_70b report           # bench/results/rehearsal_70b.{json,md}, cached cells only

(``python bench/rehearsal_70b/run.py <command>`` is the same entry point.)

Modules: ``common`` (shapes, paths, cache), ``micro``, ``blocks`` (the harness cells), ``pipeline``,
``planner`` (predictions of ``xpert_dist.plan`` for the cells), ``extrapolate`` (the 80-block model on
8 x 8 GPUs), ``report`` (bench/results/rehearsal_70b.{json,md} from the cache), ``run`` (command line).
"""
