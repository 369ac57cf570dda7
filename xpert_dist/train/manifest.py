"""The run manifest: what produced this model (config, versions, data and mask hashes, outcome)."""
from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

from ..config import RunConfig
from ..utils.atomic import atomic_write_json

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "datasets", "submitit", "xpert-dist")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write(out: Path, cfg: RunConfig, results: dict, pruner, data_sha256: str) -> dict:
    last = pruner.reports[-1] if pruner.reports else None
    man = {
        "name": cfg.name,
        "config": cfg.to_dict(),
        "versions": versions(),
        "world_size": results.get("world_size", 1),
        "data_sha256": data_sha256,
        "mask_sha256": dict(sorted(last.mask_sha256.items())) if last else {},
        "sparsity": results.get("sparsity", {}),
        "final_loss": results.get("final_loss"),
        "metrics": results.get("metrics", {}),
        "timing": results.get("timing", {}),
        "memory": results.get("memory", {}),
    }
    atomic_write_json(Path(out) / "manifest.json", man)
    return man
