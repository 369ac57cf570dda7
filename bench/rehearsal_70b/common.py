"""Shared pieces of the 70B rehearsal: repository paths, the result cache, the 70B-family block shapes."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
CACHE = RESULTS / "cache"
MiB, GiB = 1024 ** 2, 1024 ** 3
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
L70 = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
# block shapes of the cells: the exact 70B one and the same family at 1/2, 1/4 and 1/8 width (head_dim 128,
# MLP/hidden = 3.5, 8 query heads per KV head, as in Llama-2-70B)
SHAPES = {
    "70b": dict(L70),
    "70b-half": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=4),
    "70b-quarter": dict(hidden_size=2048, intermediate_size=7168, num_attention_heads=16, num_key_value_heads=2),
    "70b-eighth": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=1),
}
VOCAB = 512
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors go back to the OS: RSS = live memory


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def llama_config(shape: str, layers: int) -> dict:
    return dict(SHAPES[shape], vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
