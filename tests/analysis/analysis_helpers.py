"""Helpers for the analysis tests: the analyze launcher as a module, PNG header reading, stored runs."""
from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def load_analyze():
    spec = importlib.util.spec_from_file_location("xpert_analyze_launcher", REPO / "launchers" / "analyze.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; asserts the signature and chunk type."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_run(run_dir: Path, name: str, method: str, metrics: dict, sparsity: float, n_layers: int = 2,
              seed: int = 0, prune_steps=(), masks: bool = True) -> Path:
    """A finished run's stored files, written by hand in the schema of xpert_dist.report.results
    (results.json, manifest.json, masks.safetensors) without running anything."""
    from xpert_dist.train.export import save_masks

    run_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.{m}" for i in range(n_layers) for m in LLAMA]
    keep = {}
    for n in names:
        k = torch.ones(8, 16, dtype=torch.bool)
        if sparsity:
            idx = torch.randperm(k.numel(), generator=g)[: round(sparsity * k.numel())]
            k.view(-1)[idx] = False
        keep[n] = k
    reports = []
    for j, step in enumerate(list(prune_steps) + ["final"]):
        moved = {n: round(0.3 / (j + 1) * (1 + i % 3) / 3, 4) for i, n in enumerate(names)} if j else {}
        reports.append({"step": j, "final": step == "final", "target_sparsity": sparsity, "seconds": 1.5 + j,
                        "sparsity": {n: sparsity for n in names}, "mask_sha256": {}, "moved": moved})
    results = {
        "name": name,
        "config": {"domain": "health", "model": {"name_or_path": "tiny"},
                   "prune": {"method": method, "sparsity": sparsity, "schedule": "steps", "pbs": "diagonal",
                             "pattern": "unstructured"},
                   "lora": {"r": 8}, "train": {"max_steps": 6}, "data": {"seq_len": 32}},
        "metrics": metrics,
        "loss_history": [[s, 3.0 - 0.1 * s - 0.05 * seed] for s in range(1, 7)],
        "prune_steps": list(prune_steps),
        "sparsity": {n: float((~keep[n]).sum()) / keep[n].numel() for n in names} if method != "none" else {},
        "prune_reports": reports if method != "none" else [],
        "timing": {"train_s": 10.0 + seed, "prune_s": 2.0, "total_s": 14.0},
        "memory": {"peak_rss_mb": 900.0 + seed},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "manifest.json").write_text(json.dumps({"name": name, "metrics": metrics}))
    if masks and method != "none":
        save_masks(keep, run_dir / "masks.safetensors")
    return run_dir
