"""Read a run's ``results.json``, and helpers shared by the plots and the markdown: atomic writes,
module-name parsing, value formatting. Reports never recompute anything: all numbers come from here.

Schema of ``results.json`` (only ``name`` is required; the rest default to empty)::

    {"name": str, "config": {...RunConfig.to_dict()...}, "metrics": {"perplexity": 12.3, ...},
     "loss_history": [[step, loss], ...], "prune_steps": [step, ...],
     "sparsity": {"model.layers.0.self_attn.q_proj": 0.4, ...}, "timing": {...}, "memory": {...},
     "reference": {"base": {"metrics": {...}, "cache": path, "cached": bool},
                   "dense_lora": {"run": dir, "name": str, "method": str, "metrics": {...}}}}
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..config import LLAMA_LINEARS
from ..errors import ConfigError
from ..utils.jsonfile import read_json
from ..utils.atomic import atomic_write_bytes as _atomic_bytes

RESULTS_FILE = "results.json"
_DICT_KEYS = ("config", "metrics", "sparsity", "timing", "memory")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def load_results(run_dir: str | Path) -> dict:
    """The validated contents of ``run_dir/results.json`` with every optional key filled in."""
    path = Path(run_dir) / RESULTS_FILE
    data = read_json(path, "run results file")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ConfigError(f"run results file {path} needs an object with a string 'name'")
    for key in _DICT_KEYS:
        data[key] = data.get(key) or {}
        if not isinstance(data[key], dict):
            raise ConfigError(f"{path}: '{key}' must be an object, got {type(data[key]).__name__}")
    history = data.get("loss_history") or []
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in history):
        raise ConfigError(f"{path}: 'loss_history' must be a list of [step, loss] pairs")
    data["loss_history"] = [[float(s), float(v)] for s, v in history]
    data["prune_steps"] = [float(s) for s in data.get("prune_steps") or []]
    return data


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path`` (no torn files)."""
    _atomic_bytes(path, data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def parse_module(name: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.up_proj`` -> ``(3, "up_proj")``; None for names outside numbered layers."""
    name = name.removesuffix(".weight")
    m = _LAYER.search(name)
    return (int(m.group(1)), name.rsplit(".", 1)[-1]) if m else None


def sparsity_grid(sparsity: dict[str, float]) -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, modules, grid[layer][module]) with NaN where a module was not reported.

    Modules follow the Llama order (q k v o gate up down), unknown ones after, alphabetically.
    """
    cells: dict[tuple[int, str], float] = {}
    for name, value in sparsity.items():
        parsed = parse_module(name)
        if parsed is not None and isinstance(value, (int, float)):
            cells[parsed] = float(value)
    layers = sorted({layer for layer, _ in cells})
    found = {mod for _, mod in cells}
    modules = [m for m in LLAMA_LINEARS if m in found] + sorted(found - set(LLAMA_LINEARS))
    grid = [[cells.get((layer, mod), math.nan) for mod in modules] for layer in layers]
    return layers, modules, grid


def layer_means(sparsity: dict[str, float]) -> tuple[list[int], list[float]]:
    """Unweighted mean sparsity over the reported modules of each layer."""
    layers, _, grid = sparsity_grid(sparsity)
    means = []
    for row in grid:
        vals = [v for v in row if not math.isnan(v)]
        means.append(sum(vals) / len(vals))
    return layers, means


def get_path(tree: dict, dotted: str, default=None):
    """``get_path(cfg, "prune.method")``: a nested lookup that tolerates missing sections."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def fmt_value(key: str, value) -> str:
    """A table cell: bytes (``*bytes*``) and MiB (``*_mb``) as MiB/GiB, seconds (``*_s``) with ``s``,
    floats with 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)):
        k = key.lower()
        mib = value / 2**20 if "bytes" in k else value if k.endswith(("_mb", "_mib")) else None
        if mib is not None:
            return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"
        if k.endswith(("_s", "_sec", "_seconds")) or k in ("s", "seconds"):
            return f"{value:.1f} s"
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)
    return str(value)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (``|`` in cells escaped)."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
