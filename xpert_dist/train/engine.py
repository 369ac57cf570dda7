"""The optimisation engine: DeepSpeed (ZeRO-2/3, offload) or plain torch, behind one small interface.

The DeepSpeed JSON describes sharding and offload; batch size, accumulation and learning rate
come from the run config and are written into it (``train.batch_size`` is the global batch, the
per-GPU micro-batch and the accumulation follow from the world size, see
:func:`xpert_dist.train.data.batch_split`). A JSON that states a different value is a
contradiction and is refused before any model is loaded.

Every forward's loss is its token-loss sum over the token count of the whole global batch
(``num_items_in_batch``), so the step's gradient is the global token mean for any split. Plain
torch sums the ranks' gradients with one all-reduce; the reproducibility mode
(``train.reproducible``) instead sums the per-leaf gradients along the canonical pairwise tree
over the step's global leaf indices (:mod:`xpert_dist.distributed.tree_reduce`), which gives
bit-identical gradients, losses and hence weights for every world size.
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
from .data import StepBatch, batch_split

log = logging.getLogger(__name__)


def load_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config for this run, with the run config's values filled in; contradictions raise."""
    path = Path(cfg.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path} is not valid JSON: {e}") from e
    t = cfg.train
    split = batch_split(t, world_size)
    want = {"train_micro_batch_size_per_gpu": split.micro, "gradient_accumulation_steps": split.accum,
            "train_batch_size": split.global_batch}
    for key, value in want.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"ds_config {path}: {key}={ds[key]} contradicts the run config "
                              f"(train.batch_size={t.batch_size} global, train.micro_batch_size="
                              f"{t.micro_batch_size}, world size {world_size} -> {key}={value})")
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


def lr_at(step: int, cfg: RunConfig, total_steps: int, restarts: tuple[int, ...] = ()) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak. ``restarts``: optimizer-step indices at which
    the schedule starts again (warm-up, then cosine over the steps left): learning-rate rewinding after
    a prune step (``prune.lr_rewind``; Renda et al. 2020)."""
    t = cfg.train
    start = max((r for r in restarts if r <= step), default=0)
    step, total_steps = step - start, total_steps - start
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def set_threads(t) -> None:
    """``torch.set_num_threads(train.threads)``; 1 thread in the reproducibility mode when unset
    (a kernel may split a reduction differently with another thread count)."""
    threads = t.threads or (1 if t.reproducible else None)
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def leaf_seed(seed: int, step: int, leaf: int) -> int:
    """The RNG seed of one leaf's forward (LoRA dropout) in the reproducibility mode: a function of
    the run seed, the optimizer step and the global leaf index only, never of the rank."""
    return (seed * 1_000_003 + step) * 1_000_033 + leaf


class Engine:
    """``step(StepBatch) -> loss``: one optimizer step over this rank's forwards; the loss returned
    is the token mean over the whole global batch (the same on every rank)."""

    def __init__(self, model: nn.Module, cfg: RunConfig, total_steps: int, world_size: int = 1,
                 lr_restarts: tuple[int, ...] = ()):
        self.cfg, self.total_steps, self.lr_restarts = cfg, total_steps, tuple(lr_restarts)
        self.steps_done = 0
        self.world_size = world_size
        self.reproducible = bool(cfg.train.reproducible)
        set_threads(cfg.train)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ConfigError("no trainable parameters: check lora.target_modules")
        self.deepspeed = cfg.ds_config is not None
        if self.deepspeed:
            import deepspeed

            ds = load_ds_config(cfg, world_size)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, config=ds,
                                                                     model_parameters=self.trainable)
            self.module = self.engine.module
        else:
            self.module = model
            self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def _set_lr(self) -> float:
        lr = lr_at(self.steps_done, self.cfg, self.total_steps, self.lr_restarts)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def step(self, batch: StepBatch) -> float:
        self.module.train()
        self._set_lr()
        if self.reproducible:
            loss = self._tree_step(batch)
        elif self.deepspeed:
            loss = self._deepspeed_step(batch)
        else:
            loss = self._torch_step(batch)
        self.steps_done += 1
        return loss

    def _forward(self, mb: dict, num_items: int) -> torch.Tensor:
        """The forward's token-loss sum divided by the global batch's token count."""
        model = self.engine if self.deepspeed else self.module
        return model(**mb, num_items_in_batch=num_items).loss

    def _deepspeed_step(self, batch: StepBatch) -> float:
        # DeepSpeed divides the loss by the accumulation steps and averages gradients over ranks;
        # scaling by both makes its gradient the sum of the per-forward gradients (the global mean)
        scale = len(batch) * _dist_world()
        total = 0.0
        for mb in batch:
            loss = self._forward(mb, batch.num_items)
            self.engine.backward(loss * scale)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            total += float(loss.detach())
        return self._sum_over_ranks(total)

    def _torch_step(self, batch: StepBatch) -> float:
        total = 0.0
        for mb in batch:
            loss = self._forward(mb, batch.num_items)
            loss.backward()
            total += float(loss.detach())
        self._sum_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._sum_over_ranks(total)

    def _tree_step(self, batch: StepBatch) -> float:
        """Reproducibility mode: each leaf's gradient (and loss) is one flat vector, summed along the
        canonical tree over the step's global leaf indices, across ranks."""
        from ..distributed.tree_reduce import tree_all_reduce
        from ..stats.tree import TreeSum

        tree = TreeSum(inplace=True)
        for leaf, mb in zip(batch.leaves, batch.micro):
            torch.manual_seed(leaf_seed(self.cfg.train.seed, self.steps_done, leaf))  # dropout per global leaf
            loss = self._forward(mb, batch.num_items)
            loss.backward()
            parts = []
            for p in self.trainable:
                parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if p.grad is None
                             else p.grad.reshape(-1))
                p.grad = None
            parts.append(loss.detach().reshape(1).to(parts[0].dtype))
            tree.push(leaf, torch.cat(parts))
        per_rank = len(batch)
        ranges = [(r * per_rank, (r + 1) * per_rank) for r in range(self.world_size)]
        numel = sum(p.numel() for p in self.trainable) + 1
        flat = tree_all_reduce(tree, ranges, numel, self.trainable[0].dtype, device=self.trainable[0].device)
        offset = 0
        for p in self.trainable:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(flat[-1])

    @staticmethod
    def _sum_over_ranks(value: float) -> float:
        """The step's loss: each rank holds its forwards' share of the global token mean."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def _sum_gradients(self) -> None:
        """Data parallelism without DeepSpeed (torchrun, srun): sum of the LoRA gradients over ranks
        (each rank's forwards already carry their share of the global token mean)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in self.trainable if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def optimizer_state(self) -> dict:
        return {} if self.deepspeed else self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        if state and not self.deepspeed:
            self.optimizer.load_state_dict(state)
