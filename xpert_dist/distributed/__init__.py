"""Distribution: contexts (single process, torch.distributed / ZeRO-3), owners, process-group set-up.

Public API: ``DistContext``, ``TorchDistContext``, ``from_environment``, ``assign_owners``,
``init_distributed``. DeepSpeed is imported lazily (only when ZeRO-3 parameters are met).
"""
from .context import DistContext, from_environment  # noqa: F401
from .multirank import TorchDistContext  # noqa: F401
from .owners import assign_owners, balance_bound  # noqa: F401
from .comm import init_distributed, timeout_seconds  # noqa: F401
