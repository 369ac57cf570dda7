"""The same job through several launchers: the commands, and how far two exports of it lie apart.

``launcher_command`` builds the command line of ``launchers/run.py`` under one process, the deepspeed launcher or
torchrun (ZeRO-3 for the latter two); ``pruned_linears`` reads an export's linear weights; ``mask_disagreement`` is
the share of mask entries (``weight != 0``) on which two exports differ, and ``update_difference`` how far one
export's compensation (the OBS update of the kept weights) is from a reference export's, on the rows whose masks
agree. ``tests/train/test_zero3_real.py`` bounds these between launchers and ``bench/calib_dtype_drift.py`` measures
them by calibration precision.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..models.structure import LLAMA_LINEARS

__all__ = ["launcher_command", "pruned_linears", "base_linears", "mask_disagreement", "update_difference"]

LAUNCHERS = ("python", "deepspeed", "torchrun")


def launcher_command(launcher: str, world: int, run_args: list[str], ds_config: str | Path, port: int) -> list[str]:
    """``launchers/run.py run_args`` under ``launcher`` (``python``: one process, no DeepSpeed config; ``deepspeed``
    / ``torchrun``: ``world`` processes on this machine with ``ds_config``, rendezvous on ``port``)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; one of {LAUNCHERS}")
    bindir = os.path.dirname(sys.executable)
    if launcher == "python":
        return [sys.executable, "launchers/run.py", *run_args]
    if launcher == "torchrun":
        head = [os.path.join(bindir, "torchrun"), "--nproc_per_node", str(world)]
    else:
        head = [os.path.join(bindir, "deepspeed"), "--num_gpus", str(world)]
    return [*head, "--master_port", str(port), "launchers/run.py", *run_args, "--ds_config", str(ds_config)]


def _linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LLAMA_LINEARS


def pruned_linears(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The float32 weights of every decoder linear in a run's export (``<run_dir>/model/model.safetensors``)."""
    from safetensors.torch import load_file

    sd = load_file(Path(run_dir) / "model" / "model.safetensors")
    return {n: w.float() for n, w in sd.items() if _linear(n)}


def base_linears(name_or_path: str = "smollm2") -> dict[str, torch.Tensor]:
    """The decoder linears' weights of the base model the runs started from."""
    from ..config import ModelConfig
    from ..models.loading import load_model

    model = load_model(ModelConfig(name_or_path=name_or_path))
    return {n: p.detach().float() for n, p in model.named_parameters() if _linear(n)}


def _kept(w: torch.Tensor) -> torch.Tensor:
    return w if w.dtype == torch.bool else w != 0


def mask_disagreement(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """Share of all entries whose kept/pruned state differs (weights: kept = non-zero; or bool masks)."""
    diff = sum(int((_kept(ref[k]) != _kept(got[k])).sum()) for k in ref)
    return diff / sum(v.numel() for v in ref.values())


def update_difference(base: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                      got: dict[str, torch.Tensor]) -> float:
    """``||W_got − W_ref|| / ||W_ref − W_base ⊙ M_ref||`` over the rows of every matrix whose masks agree: the
    distance of ``got``'s compensation from ``ref``'s, relative to how far ``ref``'s moved the kept weights.
    Raises ValueError when ``ref`` is the masked base (nothing was compensated: the ratio means nothing)."""
    num = den = 0.0
    for name, w0 in base.items():
        a, b = ref[name], got[name]
        rows = ((a != 0) == (b != 0)).all(dim=1)
        num += float((a[rows] - b[rows]).square().sum())
        den += float((a[rows] - w0[rows] * (a[rows] != 0)).square().sum())
    if den <= 0:
        raise ValueError("the reference export equals the masked base weights: nothing was compensated")
    return (num / den) ** 0.5
