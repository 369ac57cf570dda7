#!/usr/bin/env python
"""Run one xpert-dist job: LoRA fine-tuning with in-loop EfficientXpert pruning, export, evaluation.

    python launchers/run.py --config configs/default_health.yaml prune.sparsity=0.5
    torchrun --nproc_per_node 2 launchers/run.py --config cfg.yaml
    deepspeed --num_gpus 2 launchers/run.py --ds_config ds_configs/zero3.json --config cfg.yaml
    srun python launchers/run.py --config cfg.yaml          (inside an sbatch allocation)

Overrides are ``section.key=value`` (YAML values, ``prune.pattern=2:4`` stays a string), before or
after the options. ``--ds_config`` is the same as ``ds_config=PATH``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xpert_dist.launch.run_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
