"""Memory planner: per-rank peak accelerator and host memory of a training step and a prune step.

``estimate(PlanSpec(...)) -> Plan``; CLI ``python -m xpert_dist.plan --help``.
"""
from .memory import Constants, Plan, PlanSpec, estimate, format_table, layer_activation_bytes  # noqa: F401
from .shapes import ModelShape  # noqa: F401
