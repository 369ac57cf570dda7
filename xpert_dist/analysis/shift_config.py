"""Settings of the structural-shift analysis: the domains compared and the ShiftConfig."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import LoraSettings, ModelConfig, PruneConfig
from ..errors import ConfigError

PHASES = ("before", "after")
SCORED_METHODS = ("magnitude", "wanda", "foresight")
BUILTIN_DOMAINS = ("general", "health", "legal")


@dataclass(frozen=True)
class Domain:
    """A domain: a short name (file names, tables) and the dataset spec its text comes from."""

    name: str
    spec: str


def parse_domains(text: str | list[str]) -> list[Domain]:
    """``"general,health,legal"`` or ``"med=data/med.jsonl,legal"`` -> domains (names unique)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = []
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            spec = item
            name = item if re.fullmatch(r"[A-Za-z0-9_.-]+", item) else Path(item).stem
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()) or "domain"
        out.append(Domain(name, spec.strip()))
    names = [d.name for d in out]
    if len(out) < 2:
        raise ConfigError(f"shift analysis needs at least two domains, got {names}")
    if len(set(names)) != len(names):
        raise ConfigError(f"domain names must be unique, got {names} (use name=spec)")
    return out


@dataclass
class ShiftConfig:
    out_dir: str
    domains: list[Domain]
    model: ModelConfig = field(default_factory=ModelConfig)
    method: str = "foresight"
    sparsities: list[float] = field(default_factory=lambda: [0.4, 0.5])
    group: str = "output"
    variant: str = "exact"
    calibration: str = "dense"  # dense | sequential
    calib_samples: int = 32
    calib_seq_len: int = 256
    batch_size: int = 8  # calibration forward batch
    adapt_steps: int = 20  # 0: no "after" phase
    adapt_batch_size: int = 4
    adapt_seq_len: int = 256
    adapt_lr: float = 2e-4
    adapt_max_train_samples: int | None = None
    adapt_domains: list[str] | None = None  # names of the domains to adapt (None: all)
    lora: LoraSettings = field(default_factory=LoraSettings)
    text_field: str = "text"
    reference_domain: str | None = "general"
    runs: list[str] = field(default_factory=list)  # run dirs whose prune reports give mask movement
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.method not in SCORED_METHODS:
            raise ConfigError(f"shift --method={self.method!r}: needs a scored method, one of {SCORED_METHODS}")
        if self.calibration not in ("dense", "sequential"):
            raise ConfigError(f"shift --calibration={self.calibration!r}: use dense or sequential")
        if not self.sparsities:
            raise ConfigError("shift needs at least one sparsity")
        for s in self.sparsities:
            if not 0.0 < float(s) < 1.0:
                raise ConfigError(f"shift --sparsity {s} must be in (0, 1)")
        for name in ("calib_samples", "calib_seq_len", "batch_size", "adapt_batch_size", "adapt_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"shift {name}={getattr(self, name)} must be positive")
        if self.adapt_steps < 0:
            raise ConfigError(f"shift adapt_steps={self.adapt_steps} must be >= 0")
        names = [d.name for d in self.domains]
        unknown = sorted(set(self.adapt_domains or []) - set(names))
        if unknown:
            raise ConfigError(f"shift adapt_domains {unknown} are not among the domains {names}")

    def adapted(self) -> list[Domain]:
        """The domains that get a LoRA adaptation (an ``after`` phase)."""
        if self.adapt_steps <= 0:
            return []
        return [d for d in self.domains if self.adapt_domains is None or d.name in self.adapt_domains]
        self.prune_config(self.sparsities[0])  # validates group / variant

    def prune_config(self, sparsity: float) -> PruneConfig:
        cfg = PruneConfig(method=self.method, sparsity=float(sparsity), group=self.group, variant=self.variant,
                          pbs="off", ema_eta=1.0, schedule="final_only")
        from ..config import RunConfig, validate

        validate(RunConfig(prune=cfg))
        return cfg


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sp(s: float) -> str:
    """File-name tag of a sparsity: 0.4 -> ``s0p4``."""
    return "s" + f"{float(s):g}".replace(".", "p")


def config_from_settings(settings: dict, out_dir: str | Path | None = None) -> ShiftConfig:
    """The ShiftConfig stored in a ``shift.json`` (``settings``), optionally at another ``out_dir``."""
    s = dict(settings)
    s["domains"] = [Domain(**d) for d in s["domains"]]
    s["model"] = ModelConfig(**s["model"])
    s["lora"] = LoraSettings(**s["lora"])
    if out_dir is not None:
        s["out_dir"] = str(out_dir)
    known = {f.name for f in dataclasses.fields(ShiftConfig)}
    return ShiftConfig(**{k: v for k, v in s.items() if k in known})
