"""Memory planner: per-rank peak accelerator and host memory of a training step and a prune step.

``estimate(PlanSpec(...)) -> Plan``; CLI ``python -m xpert_dist.plan --help``.
"""
from .advice import format_table  # noqa: F401
from .memory import Constants, Plan, PlanSpec, estimate, layer_activation_bytes  # noqa: F401
from .shapes import ModelShape  # noqa: F401
