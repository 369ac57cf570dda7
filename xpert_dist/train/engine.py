"""The optimisation engine: DeepSpeed (ZeRO-2/3, offload) or plain torch, behind one small interface.

The DeepSpeed JSON describes sharding and offload; batch size, accumulation and learning rate
come from the run config and are written into it. A JSON that states a different value is a
contradiction and is refused before any model is loaded.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)


def load_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config for this run, with the run config's values filled in; contradictions raise."""
    path = Path(cfg.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path} is not valid JSON: {e}") from e
    t = cfg.train
    want = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.batch_size * t.grad_accum * world_size}
    for key, value in want.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"ds_config {path}: {key}={ds[key]} contradicts the run config "
                              f"(train.batch_size={t.batch_size}, train.grad_accum={t.grad_accum}, "
                              f"world size {world_size} -> {key}={value})")
        ds[key] = value
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = opt.setdefault("params", {})
    for key, value in (("lr", t.lr), ("weight_decay", t.weight_decay)):
        if key in params and params[key] != "auto" and params[key] != value:
            raise ConfigError(f"ds_config {path}: optimizer.params.{key}={params[key]} contradicts train.{key}={value}")
        params[key] = value
    bf16 = ds.setdefault("bf16", {}).get("enabled", "auto")
    if bf16 == "auto":
        ds["bf16"]["enabled"] = cfg.model.dtype == "bfloat16"
    elif bool(bf16) != (cfg.model.dtype == "bfloat16"):
        raise ConfigError(f"ds_config {path}: bf16.enabled={bf16} contradicts model.dtype={cfg.model.dtype}")
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def lr_at(step: int, cfg: RunConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class Engine:
    """``step(micro_batches) -> mean loss``: one optimizer step over ``grad_accum`` micro-batches."""

    def __init__(self, model: nn.Module, cfg: RunConfig, total_steps: int, world_size: int = 1):
        self.cfg, self.total_steps = cfg, total_steps
        self.steps_done = 0
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("no trainable parameters: check lora.target_modules")
        self.deepspeed = cfg.ds_config is not None
        if self.deepspeed:
            import deepspeed

            ds = load_ds_config(cfg, world_size)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, config=ds,
                                                                     model_parameters=trainable)
            self.module = self.engine.module
        else:
            self.module = model
            self.optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def _set_lr(self) -> float:
        lr = lr_at(self.steps_done, self.cfg, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        self.module.train()
        self._set_lr()
        losses = []
        for mb in micro_batches:
            if self.deepspeed:
                loss = self.engine(**mb).loss
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            else:
                loss = self.module(**mb).loss
                (loss / len(micro_batches)).backward()
            losses.append(float(loss.detach()))
        if not self.deepspeed:
            self._average_gradients()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return self._mean_over_ranks(sum(losses) / len(losses))

    @staticmethod
    def _mean_over_ranks(value: float) -> float:
        """The step's loss averaged over ranks, so logs and manifests do not depend on the world size."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()

    def _average_gradients(self) -> None:
        """Data parallelism without DeepSpeed (torchrun, srun): mean of the LoRA gradients over ranks."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def optimizer_state(self) -> dict:
        return {} if self.deepspeed else self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        if state and not self.deepspeed:
            self.optimizer.load_state_dict(state)
