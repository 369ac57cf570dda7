"""Paths and settings shared by the one-shot benchmark's driver and its cell scripts.

Standard library only: the llm-compressor cell imports this file from its own virtual environment.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = REPO / "bench" / "results"
OURS_PYTHON = REPO / ".venv" / "bin" / "python"
LLMC_PYTHON = REPO / ".venv-llmc" / "bin" / "python"

SPARSITY = 0.5
PATTERNS = ("unstructured", "2:4")
CALIBS = ("general", "health")  # WikiText-2 valid, MedQuAD/PubMedQA train (data aliases)
EVALS = {"wikitext2": "general_heldout", "medquad": "health_heldout"}
OUR_METHODS = ("wanda", "sparsegpt", "foresight", "magnitude")
LLMC_METHODS = ("wanda", "sparsegpt")
BATCH_SIZE = 8  # calibration batch, both implementations
SEED = 0


def settings(quick: bool) -> dict:
    """Token budgets: the full benchmark, or a smoke run (--quick) with its own cache and outputs."""
    if quick:
        return {"name": "oneshot_quick", "calib_samples": 8, "calib_len": 256, "eval_windows": 4, "eval_len": 256}
    return {"name": "oneshot", "calib_samples": 128, "calib_len": 512, "eval_windows": 16, "eval_len": 512}


def cache_dir(quick: bool) -> Path:
    return RESULTS / "cache" / settings(quick)["name"]


def model_dir() -> Path:
    """The SmolLM2-135M GGUF dequantised once to fp32 safetensors; both implementations load it."""
    return RESULTS / "cache" / "smollm2-135m-fp32"


def calib_file(quick: bool, calib: str) -> Path:
    return cache_dir(quick) / f"calib_{calib}.pt"


def eval_file(quick: bool, name: str) -> Path:
    return cache_dir(quick) / f"eval_{name}.pt"


def cell_key(calib: str | None, pattern: str | None, impl: str, method: str) -> str:
    if method == "dense":
        return "dense"
    return f"{calib}__{pattern.replace(':', 'of')}__{impl}__{method}"


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


# The seven linears of every decoder block: what both implementations prune.
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def pruned_weight_names(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.{n}.weight" for i in range(n_layers) for n in LINEARS]
