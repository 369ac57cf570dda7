"""Forward hooks that accumulate calibration statistics of linear inputs.

One statistic per *distinct* input tensor of a Llama block (q/k/v share ``attn_in``, gate/up share
``mlp_in``): the running sum of XᵀX (``full``) or only its diagonal (``diag``), plus the token
count. Sums, not means, so that statistics from several ranks or batches add up exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import StatisticsError
from ..models.structure import INPUT_GROUPS

MODES = ("diag", "full")


@dataclass
class InputStats:
    """Σ XᵀX (``full``: [in,in]) or Σ diag (``diag``: [in]) over ``n`` tokens."""

    sum: torch.Tensor
    n: int
    mode: str

    @property
    def diag(self) -> torch.Tensor:
        return self.sum if self.mode == "diag" else self.sum.diagonal()

    @property
    def hessian(self) -> torch.Tensor:
        if self.mode != "full":
            raise StatisticsError("the full XᵀX was not collected (stats mode 'diag'); "
                                  "this method needs stats mode 'full'")
        return self.sum

    def __add__(self, other: "InputStats") -> "InputStats":
        if other.mode != self.mode or other.sum.shape != self.sum.shape:
            raise StatisticsError("cannot add statistics of different mode or shape")
        return InputStats(self.sum + other.sum, self.n + other.n, self.mode)

    def nbytes(self) -> int:
        return self.sum.numel() * self.sum.element_size()


def accumulate(x: torch.Tensor, mode: str, dtype: torch.dtype, into: torch.Tensor | None) -> torch.Tensor:
    """Add the statistic of a batch of inputs ``x[..., in]`` to ``into`` (created when None)."""
    flat = x.detach().reshape(-1, x.shape[-1]).to(dtype)
    part = flat.T @ flat if mode == "full" else (flat * flat).sum(0)
    return part if into is None else into.add_(part)


class StatsCollector:
    """Context manager: hooks on the given linears of one (or more) blocks accumulate InputStats.

    ``linears`` maps a key (e.g. ``"3.q_proj"`` or ``"q_proj"``) to its module; modules whose short
    name maps to the same input group *within one block prefix* share one statistic, recorded
    once, under the group key (``"3.attn_in"``).
    """

    def __init__(self, linears: dict[str, nn.Module], mode: str = "diag", dtype: torch.dtype = torch.float32):
        if mode not in MODES:
            raise StatisticsError(f"unknown statistics mode {mode!r}; use one of {MODES}")
        self.mode, self.dtype = mode, dtype
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._targets: dict[str, nn.Module] = {}
        for key, module in linears.items():
            gkey = group_key(key)
            self._targets.setdefault(gkey, module)  # the first module of a group records it
        self._handles = []

    def _hook(self, gkey: str):
        def fn(_module, args, _out):
            x = args[0]
            self._sums[gkey] = accumulate(x, self.mode, self.dtype, self._sums.get(gkey))
            self._counts[gkey] = self._counts.get(gkey, 0) + x.reshape(-1, x.shape[-1]).shape[0]
        return fn

    def __enter__(self) -> "StatsCollector":
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in self._targets.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def stats(self) -> dict[str, InputStats]:
        missing = sorted(set(self._targets) - set(self._sums))
        if missing:
            raise StatisticsError(f"no calibration data reached {missing}")
        return {k: InputStats(self._sums[k], self._counts[k], self.mode) for k in sorted(self._sums)}


def group_key(key: str) -> str:
    """``"3.q_proj"`` -> ``"3.attn_in"``; ``"q_proj"`` -> ``"attn_in"``."""
    prefix, _, short = key.rpartition(".")
    if short not in INPUT_GROUPS:
        raise StatisticsError(f"unknown module {short!r}; expected one of {sorted(INPUT_GROUPS)}")
    return f"{prefix}.{INPUT_GROUPS[short]}" if prefix else INPUT_GROUPS[short]


def stats_for(stats: dict[str, InputStats], module_key: str) -> InputStats:
    """The statistic a module reads (by its key as given to the collector)."""
    return stats[group_key(module_key)]
