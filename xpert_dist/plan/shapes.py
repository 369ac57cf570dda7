"""Shapes and parameter counts of a Llama-family model from its HF ``config.json`` (no weights)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

GiB = 1024 ** 3

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# input group of each linear (modules reading the same tensor share one XᵀX), see models/structure.py
INPUT_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict, name: str = "model") -> "ModelShape":
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(name=name, vocab=int(cfg["vocab_size"]), hidden=hidden,
                       intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
                       heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       head_dim=int(cfg.get("head_dim") or hidden // heads),
                       tied=bool(cfg.get("tie_word_embeddings", False)),
                       attention_bias=bool(cfg.get("attention_bias", False)),
                       mlp_bias=bool(cfg.get("mlp_bias", False)))
        except KeyError as e:
            raise ConfigError(f"model config {name}: missing field {e.args[0]!r}") from None

    @classmethod
    def load(cls, path_or_name: str) -> "ModelShape":
        """A config.json path, or the name of a shipped config (``llama2_70b``, ``llama31_70b``, ``llama2_7b``)."""
        p = Path(path_or_name)
        if not p.is_file():
            cand = CONFIG_DIR / f"{path_or_name}.json"
            if not cand.is_file():
                shipped = sorted(x.stem for x in CONFIG_DIR.glob("*.json"))
                raise ConfigError(f"--model-config {path_or_name}: no such file, and not one of the shipped "
                                  f"configs {shipped}")
            p = cand
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model-config {p}: not valid JSON: {e}") from None
        return cls.from_config(cfg, name=p.stem)

    # ------------------------------------------------------------------ shapes
    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``name -> (out, in)`` of the seven linears of one block."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h),
                "o_proj": (h, self.q_dim), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def group_dims(self) -> dict[str, int]:
        """Input width of each statistics group (the side of its XᵀX)."""
        return {"attn_in": self.hidden, "o_in": self.q_dim, "mlp_in": self.hidden, "down_in": self.intermediate}

    # ------------------------------------------------------------------ parameter counts
    def block_linear_params(self, names=LINEARS) -> int:
        return sum(o * i for n, (o, i) in self.linear_shapes().items() if n in names)

    def block_params(self) -> int:
        bias = (self.q_dim + 2 * self.kv_dim + self.hidden if self.attention_bias else 0) + \
               (2 * self.intermediate + self.hidden if self.mlp_bias else 0)
        return self.block_linear_params() + 2 * self.hidden + bias

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embed_params() + self.layers * self.block_params() + self.hidden + head

    def lora_params(self, r: int, targets=LINEARS) -> int:
        return self.layers * sum(r * (o + i) for n, (o, i) in self.linear_shapes().items() if n in targets)
