"""Wrap a model with peft LoRA on the configured Llama linears."""
from __future__ import annotations

from torch import nn

from ..config import LoraSettings
from ..errors import ConfigError


def wrap_lora(model: nn.Module, cfg: LoraSettings, quantized: bool = False) -> nn.Module:
    """peft LoRA (r, alpha, dropout) on ``cfg.target_modules``; every target must exist in the model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} not found in the model "
                          f"({type(model).__name__})")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)
