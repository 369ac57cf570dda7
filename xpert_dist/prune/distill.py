"""Distillation from the dense model as it was before the first prune step (``prune.distill=logits``).

At the first prune step the pipeline snapshots the model (LoRA merged into a plain copy, frozen, in
eval mode: the teacher) and hooks the student: every *training* forward's loss becomes

    loss = CE + w · Σ_tokens KL(p_teacher ‖ p_student) / num_items_in_batch

over the tokens the CE counts (labels ≠ −100, next-token shifted), so the KL term carries the same
global-token-mean normalisation as the CE (any micro-batch split gives the same gradient).
Evaluation forwards (``model.eval()``) are untouched.

Cost (plain torch): one more forward of the teacher per micro-batch (no backward: ~+50% of a
frozen-base LoRA step's matmul work) and one more copy of the weights (SmolLM2-135M fp32: 0.54 GB)
plus the teacher's logits of a micro-batch (``rows·seq·vocab·4`` B). Not implemented under
DeepSpeed or with a quantised base (refused at configuration time); at 70B the teacher would be a
second ZeRO-3-partitioned frozen copy (``deepspeed.init_inference`` or the same engine's params with
the pruned complement ``W⊙(1−M)`` kept offloaded), or its top-k logits precomputed once, before
the first prune step, over the tokens still to be trained on (150 steps × 1024 tokens × top-64 ×
6 B ≈ 60 MB per rank).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def snapshot_teacher(model: nn.Module) -> nn.Module:
    """A frozen plain copy of ``model`` with its LoRA merged (effective weights ``W + s·B·A``)."""
    teacher = copy.deepcopy(model)
    if hasattr(teacher, "merge_and_unload"):
        teacher = teacher.merge_and_unload()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over next-token positions with ``labels != -100`` of KL(teacher ‖ student)."""
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    valid = labels[:, 1:] != -100
    logp_s = F.log_softmax(s, dim=-1)
    logp_t = F.log_softmax(t, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    return (kl * valid).sum()


class LogitDistiller:
    """Adds ``weight · KL(teacher ‖ student)`` to the loss of the student's training forwards."""

    def __init__(self, model: nn.Module, weight: float):
        self.teacher = snapshot_teacher(model)
        self.weight = float(weight)
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if not module.training or getattr(output, "loss", None) is None:
            return output
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        if labels is None:
            labels = ids
        n = kwargs.get("num_items_in_batch")
        with torch.no_grad():
            t_logits = self.teacher(input_ids=ids, attention_mask=kwargs.get("attention_mask")).logits
        kl = kl_sum(output.logits, t_logits, labels)
        denom = n if n is not None else (labels[:, 1:] != -100).sum()
        output.loss = output.loss + self.weight * kl / denom
        return output

    def remove(self) -> None:
        self.handle.remove()
        self.teacher = None


def attach(model: nn.Module, cfg) -> LogitDistiller | None:
    """The distiller ``cfg.distill`` (a PruneConfig) asks for, snapshotting ``model`` now (None: off)."""
    if cfg.distill == "off":
        return None
    return LogitDistiller(model, cfg.distill_weight)


def check_resume(cfg, first_prune_step: int | None, step: int) -> None:
    """The teacher is not checkpointed: a run resumed after its first prune step cannot rebuild it."""
    if cfg.distill != "off" and first_prune_step is not None and step > first_prune_step:
        raise ConfigError(f"prune.distill={cfg.distill}: cannot resume at step {step}, after the first prune step "
                          f"({first_prune_step}); the teacher (the model before it) is not checkpointed")
